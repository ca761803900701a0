/*
 * tcp_upper._speedups: upper-case UTF-8 bytes in one pass, without building a str.
 *
 * make_upper(mapping) returns a function upper(data) that returns exactly
 *     data.decode("utf-8", "surrogateescape").upper().encode("utf-8", "surrogateescape")
 * for any bytes: ASCII a-z become A-Z, every valid UTF-8 sequence whose code point has an upper
 * case mapping is replaced by the UTF-8 of that mapping (it may be longer: U+00DF -> "SS"), and
 * every other byte, valid or not, is copied unchanged. Which code points map to what is not
 * written here: tcp_upper/casing.py computes it from the running Python's str.upper() and hands
 * it to make_upper(), so this module always agrees with the Unicode version of the Python it
 * runs in.
 *
 * The compiled table lives in a PyCapsule that is the returned function's `self` (no
 * module-level state): the caller's reference to the function keeps the table alive while the
 * loop runs without the GIL, and a second make_upper() (a reload of casing.py) never frees a
 * table another thread is using.
 *
 * find_command_line(data, at_line_start) finds the first complete line of data that is the
 * disconnect command (see find_command_line below and tcp_upper/protocol.py).
 *
 * Plain C API, no limited API: builds on CPython 3.9 to 3.13.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
/* SSE2 (every x86-64 CPU has it) scans for the command sixteen bytes an instruction; elsewhere,
 * or built with -DTCP_UPPER_NO_SSE2 (tests/test_casing.py does, to test that path too), eight
 * bytes at a time in plain C. */
#if defined(__SSE2__) && !defined(TCP_UPPER_NO_SSE2)
#define USE_SSE2 1
#include <emmintrin.h>
#endif

/* Code points at or above LIMIT never change under str.upper() (tests/test_casing.py checks it
 * for the running Python), so the table only covers 0..LIMIT-1. */
#define LIMIT 0x20000
/* The table is two-level: code points are grouped in blocks of BLOCK; a block in which nothing
 * changes shares the all-zero block 0, so only the ~40 blocks with letters take memory. */
#define BLOCK_BITS 7
#define BLOCK (1 << BLOCK_BITS)
#define NBLOCKS (LIMIT >> BLOCK_BITS)
/* Longest mapped UTF-8 allowed: str.upper() gives at most 3 code points (6 bytes in Unicode
 * 15); 3 code points of 4 bytes is the most UTF-8 could need. */
#define MAX_MAPPED 12
/* Inputs larger than this release the GIL while they are upper-cased (one thread per client:
 * the others keep running). Below it the release and re-acquire cost more than they give. */
#define RELEASE_GIL_ABOVE 4096

/* For upper-casing ASCII eight bytes at a time. */
#define ONES UINT64_C(0x0101010101010101)
#define ASCII_TOP_BITS (0x80 * ONES)

#define CAPSULE_NAME "tcp_upper._speedups.table"

/* Bytes 0x00-0xFF through ASCII upper case: a-z become A-Z, every other byte stays. */
static unsigned char ascii_upper[256];

/* Whether any byte of word is C2 or above (could start a multi-byte sequence): such a byte has
 * its top bit set and its low seven bits at 0x42 or more, so low7 + 0x3E carries into bit 7
 * (at most 0x7F + 0x3E = 0xBD: no carry into the next byte). */
#define ANY_LEAD(word) \
    ((((word) & (0x7F * ONES)) + 0x3E * ONES) & (word) & ASCII_TOP_BITS)

/* Eight bytes with a-z upper-cased, every other byte as it is. Of the seven low bits b of each
 * byte, b + 1F has its top bit set when b >= 'a', b + 05 when b > 'z' (no carry into the next
 * byte either way), so their top bits, less those of bytes whose own top bit is set, give the
 * lower-case letters; moving that bit to 0x20 and flipping it upper-cases them. */
static inline uint64_t
ascii_upper_word(uint64_t word)
{
    uint64_t low = word & (0x7F * ONES);
    uint64_t lower = (low + 0x1F * ONES) & ~(low + 0x05 * ONES) & ~word & ASCII_TOP_BITS;
    return word ^ (lower >> 2);
}

typedef struct {
    unsigned char len;                  /* 0 in mapping 0: "unchanged" */
    unsigned char bytes[MAX_MAPPED];    /* the UTF-8 of the upper case */
} Mapping;

typedef struct {
    uint16_t block_of[NBLOCKS];         /* code point >> BLOCK_BITS -> its block (0: none maps) */
    uint16_t (*slots)[BLOCK];           /* slots[block][cp % BLOCK] -> its mapping (0: none) */
    Mapping *mappings;                  /* mappings[0] is the empty "unchanged" one */
    Py_ssize_t growth;                  /* most output bytes per input byte, for sizing */
    unsigned char starts_mapped[256];   /* 1 for a lead byte of some mapped code point */
    uint16_t pairs[0x10000];            /* two bytes as they lie in memory -> their upper case
                                           as it lies in memory, when the two are two ASCII
                                           characters or one two-byte character whose upper
                                           case is two bytes too; NOT_PAIR for anything else
                                           (use mappings) */
} Table;

#define NOT_PAIR 0xFFFF  /* FF FF: never the upper case of a pair (FF is not in UTF-8) */

static void
table_free(Table *table)
{
    if (table != NULL) {
        PyMem_RawFree(table->slots);
        PyMem_RawFree(table->mappings);
        PyMem_RawFree(table);
    }
}

static void
capsule_destructor(PyObject *capsule)
{
    table_free((Table *)PyCapsule_GetPointer(capsule, CAPSULE_NAME));
}

/* Length of the UTF-8 encoding of code point cp (which is valid: not a surrogate). */
static Py_ssize_t
utf8_length(long cp)
{
    return cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
}

/* Check one (key, value) pair of the mapping dict; on success store the code point. */
static int
check_entry(PyObject *key, PyObject *value, long *cp)
{
    if (!PyLong_Check(key) || !PyBytes_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "table must map int code points to bytes");
        return -1;
    }
    *cp = PyLong_AsLong(key);
    if (*cp == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (*cp < 0 || *cp >= LIMIT || (*cp >= 0xD800 && *cp < 0xE000)) {
        PyErr_Format(PyExc_ValueError,
                     "code point %ld is outside the table (0..0x%X, no surrogates)", *cp, LIMIT - 1);
        return -1;
    }
    if (PyBytes_GET_SIZE(value) < 1 || PyBytes_GET_SIZE(value) > MAX_MAPPED) {
        PyErr_Format(PyExc_ValueError, "mapping of code point %ld must be 1 to %d bytes",
                     *cp, MAX_MAPPED);
        return -1;
    }
    return 0;
}

/* Where the two bytes at p are in table->pairs: read through memcpy, as the table is filled,
 * so it is right whatever the CPU's byte order. */
static inline uint16_t
pair_index(const unsigned char *p)
{
    uint16_t index;
    memcpy(&index, p, 2);
    return index;
}

/* table->pairs before the mappings are known: two ASCII characters to ascii_upper of each, a
 * two-byte character (C2-DF, 80-BF) to itself; compile_table then writes the two-byte
 * characters that change. */
static void
fill_pairs(Table *table)
{
    for (unsigned int a = 0; a < 256; a++) {
        for (unsigned int b = 0; b < 256; b++) {
            unsigned char raw[2] = {(unsigned char)a, (unsigned char)b}, upper[2] = {0xFF, 0xFF};
            if (a < 0x80 && b < 0x80) {
                upper[0] = ascii_upper[a];
                upper[1] = ascii_upper[b];
            }
            else if (a >= 0xC2 && a <= 0xDF && (b & 0xC0) == 0x80) {
                memcpy(upper, raw, 2);
            }
            memcpy(&table->pairs[pair_index(raw)], upper, 2);
        }
    }
}

/* The table compiled from mapping (dict[int, bytes]), in a capsule; NULL on error. */
static PyObject *
compile_table(PyObject *mapping)
{
    PyObject *key, *value;
    Py_ssize_t pos, nblocks = 1, nmappings = 1;
    long cp;
    Table *table;
    PyObject *capsule;

    if (!PyDict_Check(mapping)) {
        PyErr_SetString(PyExc_TypeError, "make_upper() needs a dict");
        return NULL;
    }
    if (PyDict_GET_SIZE(mapping) >= UINT16_MAX) {
        PyErr_SetString(PyExc_ValueError, "too many mappings");
        return NULL;
    }
    table = PyMem_RawCalloc(1, sizeof(Table));
    if (table == NULL) {
        return PyErr_NoMemory();
    }
    table->growth = 1;
    /* First pass: check every entry and number the blocks that hold one. */
    pos = 0;
    while (PyDict_Next(mapping, &pos, &key, &value)) {
        if (check_entry(key, value, &cp) < 0) {
            table_free(table);
            return NULL;
        }
        if (table->block_of[cp >> BLOCK_BITS] == 0) {
            table->block_of[cp >> BLOCK_BITS] = (uint16_t)nblocks++;
        }
    }
    table->slots = PyMem_RawCalloc((size_t)nblocks, sizeof(*table->slots));
    table->mappings = PyMem_RawCalloc((size_t)PyDict_GET_SIZE(mapping) + 1, sizeof(Mapping));
    if (table->slots == NULL || table->mappings == NULL) {
        table_free(table);
        return PyErr_NoMemory();
    }
    /* Second pass: fill the slots (and the pairs of the two-byte characters). The dict is ours
     * to read only; nothing ran Python code since the first pass, so it holds the same
     * entries. */
    fill_pairs(table);
    pos = 0;
    while (PyDict_Next(mapping, &pos, &key, &value)) {
        Py_ssize_t size = PyBytes_GET_SIZE(value);
        Py_ssize_t in = 0;
        Mapping *m = &table->mappings[nmappings];

        cp = PyLong_AsLong(key);
        m->len = (unsigned char)size;
        memcpy(m->bytes, PyBytes_AS_STRING(value), (size_t)size);
        table->slots[table->block_of[cp >> BLOCK_BITS]][cp & (BLOCK - 1)] = (uint16_t)nmappings++;
        in = utf8_length(cp);
        if (in == 2) {  /* the common case, read without the two-level lookup */
            unsigned char raw[2] = {(unsigned char)(0xC0 | (cp >> 6)),
                                    (unsigned char)(0x80 | (cp & 0x3F))};
            if (size == 2) {
                memcpy(&table->pairs[pair_index(raw)], m->bytes, 2);
            }
            else {
                table->pairs[pair_index(raw)] = NOT_PAIR;
            }
        }
        /* The lead byte of cp's UTF-8 (cp is at least 0x80: ASCII is never in the table). */
        table->starts_mapped[in == 2 ? 0xC0 | (cp >> 6) : in == 3 ? 0xE0 | (cp >> 12)
                             : 0xF0 | (cp >> 18)] = 1;
        if ((size + in - 1) / in > table->growth) {
            table->growth = (size + in - 1) / in;
        }
    }
    capsule = PyCapsule_New(table, CAPSULE_NAME, capsule_destructor);
    if (capsule == NULL) {
        table_free(table);
    }
    return capsule;
}

/* One sequence at *in, which starts with a lead byte of some mapped code point: decoded under
 * CPython's strict rules (the lead byte fixes the length and the range of the second byte;
 * later bytes are 80-BF), written upper-cased, or as it is when it has no upper case or is not
 * valid (then only its first byte: surrogateescape passes it through, and the next byte is
 * tried as a new start, as the codec does). Returns 0, moving nothing, when a mapping longer
 * than its input would not leave room in out for the rest of the input. */
static int
upper_sequence(const Table *table, const unsigned char **in_p, const unsigned char *end,
               unsigned char **o_p, const unsigned char *out_end)
{
    const unsigned char *in = *in_p;
    unsigned char *o = *o_p;
    unsigned int c = in[0];
    unsigned long cp = 0;
    Py_ssize_t len = 0;

    if (c >= 0xC2 && c <= 0xDF) {
        if (end - in >= 2 && (in[1] & 0xC0) == 0x80) {
            cp = ((c & 0x1Fu) << 6) | (in[1] & 0x3Fu);
            len = 2;
        }
    }
    else if (c >= 0xE0 && c <= 0xEF) {
        if (end - in >= 3 && (in[1] & 0xC0) == 0x80 && (in[2] & 0xC0) == 0x80
            && !(c == 0xE0 && in[1] < 0xA0)     /* overlong */
            && !(c == 0xED && in[1] > 0x9F)) {  /* surrogate */
            cp = ((c & 0x0Fu) << 12) | ((in[1] & 0x3Fu) << 6) | (in[2] & 0x3Fu);
            len = 3;
        }
    }
    else if (c >= 0xF0 && c <= 0xF4) {
        if (end - in >= 4 && (in[1] & 0xC0) == 0x80 && (in[2] & 0xC0) == 0x80
            && (in[3] & 0xC0) == 0x80
            && !(c == 0xF0 && in[1] < 0x90)     /* overlong */
            && !(c == 0xF4 && in[1] > 0x8F)) {  /* above U+10FFFF */
            cp = ((c & 0x07u) << 18) | ((in[1] & 0x3Fu) << 12) | ((in[2] & 0x3Fu) << 6)
                 | (in[3] & 0x3Fu);
            len = 4;
        }
    }
    if (len == 0) {
        *o++ = (unsigned char)c;
        in++;
    }
    else {
        uint16_t index = 0;
        if (cp < LIMIT) {
            index = table->slots[table->block_of[cp >> BLOCK_BITS]][cp & (BLOCK - 1)];
        }
        if (index != 0) {
            const Mapping *m = &table->mappings[index];
            if (m->len > len && (out_end - o) - m->len < (end - in) - len) {
                return 0;  /* no room left for the rest: the caller grows out */
            }
            memcpy(o, m->bytes, m->len);
            o += m->len;
        }
        else {
            memcpy(o, in, (size_t)len);  /* valid, but no upper case: unchanged */
            o += len;
        }
        in += len;
    }
    *in_p = in;
    *o_p = o;
    return 1;
}

/* The two upper-casing loops below stay apart: inlined into one function, GCC compiles the
 * text loop about 1.5 times slower. The check of each candidate X goes into the command scan:
 * a call per candidate cost about a tenth more on lines that all hold the word. */
#if defined(__GNUC__)
#define NOINLINE __attribute__((noinline))
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define NOINLINE
#define ALWAYS_INLINE inline
#endif

/* Byte by byte from *in_p to at least stop (a sequence that starts before stop may end past
 * it): a byte that starts no mapped code point, or is not followed by a continuation byte (so
 * starts no valid sequence), goes through ascii_upper; a two-byte sequence is read from
 * pairs; anything else is upper_sequence's. Returns 0 when out of room (see
 * upper_sequence). */
static int
upper_bytes(const Table *table, const unsigned char **in_p, const unsigned char *stop,
            const unsigned char *end, unsigned char **o_p, const unsigned char *out_end)
{
    const unsigned char *in = *in_p;
    unsigned char *o = *o_p;
    int room = 1;

    while (in < stop) {
        unsigned int c = *in;
        if (!table->starts_mapped[c] || end - in < 2 || (in[1] & 0xC0) != 0x80) {
            *o++ = ascii_upper[c];
            in++;
            continue;
        }
        if (c <= 0xDF) {
            uint16_t upper = table->pairs[pair_index(in)];
            if (upper != NOT_PAIR) {
                memcpy(o, &upper, 2);
                o += 2;
                in += 2;
                continue;
            }
        }
        if (!upper_sequence(table, &in, end, &o, out_end)) {
            room = 0;
            break;
        }
    }
    *in_p = in;
    *o_p = o;
    return room;
}

/* Dense multi-byte text (accents throughout, Cyrillic, Greek): eight bytes at a time while all
 * are ASCII, then two at a time from table->pairs while they are two ASCII characters or one
 * two-byte character (up to PAIR_RUN bytes, then ASCII is tried again), then one character by
 * upper_bytes where they are neither (an ASCII byte before a two-byte character, a longer
 * sequence, an invalid byte). So each two-byte character costs one lookup and no branch that
 * depends on the text. Returns 0 when out of room. */
#define PAIR_RUN 64
static NOINLINE int
upper_text(const Table *table, const unsigned char **in_p, const unsigned char *end,
           unsigned char **o_p, const unsigned char *out_end)
{
    const unsigned char *in = *in_p;
    unsigned char *o = *o_p;
    int room = 1;

    while (in < end && room) {
        const unsigned char *stop;
        while (end - in >= 8) {
            uint64_t word;
            memcpy(&word, in, 8);
            if (word & ASCII_TOP_BITS) {
                break;
            }
            word = ascii_upper_word(word);
            memcpy(o, &word, 8);
            in += 8;
            o += 8;
        }
        stop = end - in > PAIR_RUN ? in + PAIR_RUN : end - 1;  /* in[1] is inside */
        while (in < stop) {
            uint16_t upper = table->pairs[pair_index(in)];
            if (upper == NOT_PAIR) {
                break;
            }
            memcpy(o, &upper, 2);
            in += 2;
            o += 2;
        }
        if (in < end && *in < 0x80) {  /* an ASCII byte before a two-byte character */
            *o++ = ascii_upper[*in++];
        }
        else if (in < end) {
            room = upper_bytes(table, &in, in + 1, end, &o, out_end);
        }
    }
    *in_p = in;
    *o_p = o;
    return room;
}

/* Everything but dense multi-byte text: ASCII, text with a few accents, bytes that are not
 * UTF-8. A branch per byte on lead bytes would be mispredicted every few bytes in random data,
 * and in text every accent breaks the eight-byte ASCII steps of upper_text. So a block of
 * UPPER_BLOCK bytes at a time, in two passes. First every byte goes through the ASCII rule,
 * many at a time, and the bytes that may start a sequence (C2 or above, followed by 80-BF) are
 * noted as bits of a mask: block_pass_sse2 or block_pass. Then each of those that starts a
 * mapped code point is patched in place. A mapping of another length than its input (U+0131 ->
 * "I") moves everything after it: the next block starts after it. Returns 0 when out of room. */
#define UPPER_BLOCK 512
#define MASK_WORDS (UPPER_BLOCK / 64)

#if defined(USE_SSE2)
/* The first pass over a whole block, sixteen bytes an instruction: a-z are the bytes above 60
 * and below 7B as signed bytes (so none with its top bit set), C2 and above are the negative
 * ones above C1, and 80-BF the ones below C0. next_is_continuation: the byte after the block
 * is 80-BF. */
static void
block_pass_sse2(const unsigned char *in, unsigned char *o, uint64_t starts[MASK_WORDS],
                 int next_is_continuation)
{
    const __m128i before_a = _mm_set1_epi8(0x60), after_z = _mm_set1_epi8(0x7B);
    const __m128i case_bit = _mm_set1_epi8(0x20);
    const __m128i c1 = _mm_set1_epi8((char)0xC1), c0 = _mm_set1_epi8((char)0xC0);
    uint64_t lead[MASK_WORDS], continuation[MASK_WORDS];
    int w, k;

    for (w = 0; w < MASK_WORDS; w++) {
        uint64_t leads = 0, continuations = 0;
        for (k = 0; k < 64; k += 16) {
            __m128i v = _mm_loadu_si128((const __m128i *)(in + 64 * w + k));
            __m128i lower = _mm_and_si128(_mm_cmpgt_epi8(v, before_a), _mm_cmplt_epi8(v, after_z));
            _mm_storeu_si128((__m128i *)(o + 64 * w + k),
                             _mm_xor_si128(v, _mm_and_si128(lower, case_bit)));
            leads |= (uint64_t)(unsigned int)(_mm_movemask_epi8(_mm_cmpgt_epi8(v, c1))
                                              & _mm_movemask_epi8(v)) << k;
            continuations |= (uint64_t)(unsigned int)_mm_movemask_epi8(_mm_cmplt_epi8(v, c0)) << k;
        }
        lead[w] = leads;
        continuation[w] = continuations;
    }
    for (w = 0; w < MASK_WORDS; w++) {
        uint64_t after = w + 1 < MASK_WORDS ? continuation[w + 1] & 1 : (uint64_t)next_is_continuation;
        starts[w] = lead[w] & ((continuation[w] >> 1) | (after << 63));
    }
}
#endif

/* The first pass over size bytes (a multiple of 8), eight at a time (ascii_upper_word). The
 * bytes that may start a sequence are looked for only in words that hold a byte C2 or above. */
static void
block_pass(const unsigned char *in, unsigned char *o, Py_ssize_t size, const unsigned char *end,
            uint64_t starts[MASK_WORDS])
{
    Py_ssize_t k;

    for (k = 0; k < size / 8; k++) {
        const unsigned char *w = in + 8 * k;
        uint64_t word;
        unsigned int leads = 0, j;
        memcpy(&word, w, 8);
        memcpy(o + 8 * k, &(uint64_t){ascii_upper_word(word)}, 8);
        if (!ANY_LEAD(word)) {
            continue;
        }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        if (end - w >= 9) {
            /* Byte j of the mask: w[j] is C2 or above and w[j + 1] is 80-BF (top bits 10: bit
             * 6 of each byte shifted into bit 7 of the same byte is clear). */
            uint64_t next, candidates;
            memcpy(&next, w + 1, 8);
            candidates = ANY_LEAD(word) & next & ~(next << 1) & ASCII_TOP_BITS;
            while (candidates) {
                leads |= 1u << (__builtin_ctzll(candidates) >> 3);
                candidates &= candidates - 1;
            }
        }
        else
#endif
        for (j = 0; j < 8; j++) {
            leads |= (unsigned int)(w[j] >= 0xC2 && end - (w + j) >= 2
                                    && (w[j + 1] & 0xC0) == 0x80) << j;
        }
        starts[k / 8] |= (uint64_t)leads << (8 * (k % 8));
    }
}

static NOINLINE int
upper_blocks(const Table *table, const unsigned char **in_p, const unsigned char *end,
             unsigned char **o_p, const unsigned char *out_end)
{
    const unsigned char *in = *in_p;
    unsigned char *o = *o_p;
    int room = 1;

    while (in < end && room) {
        Py_ssize_t size = end - in < UPPER_BLOCK ? end - in : UPPER_BLOCK;
        /* Where the input is final in out at the same offset as in in (past the block when a
         * sequence crosses its end). */
        const unsigned char *reach;
        uint64_t starts[MASK_WORDS] = {0};  /* bit k of word k / 64: in[k] may start one */
        int w;

        if (size < 8) {  /* the last few bytes of the input */
            room = upper_bytes(table, &in, end, end, &o, out_end);
            break;
        }
        size -= size % 8;
        reach = in + size;
#if defined(USE_SSE2)
        if (size == UPPER_BLOCK) {
            block_pass_sse2(in, o, starts, end - in > size && (in[size] & 0xC0) == 0x80);
        }
        else
#endif
        block_pass(in, o, size, end, starts);
        for (w = 0; w < MASK_WORDS; w++) {
            while (starts[w]) {
                const unsigned char *at = in + 64 * w + __builtin_ctzll(starts[w]), *next = at;
                unsigned char *o_at = o + (at - in), *o_next = o_at;
                starts[w] &= starts[w] - 1;
                if (!table->starts_mapped[at[0]]) {
                    continue;
                }
                if (at[0] <= 0xDF) {
                    uint16_t upper = table->pairs[pair_index(at)];
                    if (upper != NOT_PAIR) {  /* both bytes: the second may be past the block */
                        memcpy(o_at, &upper, 2);
                        if (at + 2 > reach) {
                            reach = at + 2;
                        }
                        continue;
                    }
                }
                if (!upper_sequence(table, &next, end, &o_next, out_end)) {
                    in = at;
                    o = o_at;
                    room = 0;
                    goto done;
                }
                if (next - at != o_next - o_at) {
                    /* What follows moved: the next block starts right after this sequence
                     * (everything before it is final; upper_sequence left room for the rest
                     * at its length). */
                    in = next;
                    o = o_next;
                    goto next_block;
                }
                if (next > reach) {
                    reach = next;
                }
            }
        }
        o += reach - in;
        in = reach;
    next_block:;
    }
done:
    *in_p = in;
    *o_p = o;
    return room;
}

/* Whether data looks like dense multi-byte text (accents throughout, Cyrillic, Greek): in its
 * first bytes, at least one in eight starts a sequence (a byte C2 or above followed by 80-BF),
 * and at most a quarter of the bytes that could start one do not. Only picks the faster of two
 * loops; both give the same bytes for any input. */
static int
looks_dense(const unsigned char *data, Py_ssize_t n)
{
    Py_ssize_t i, leads = 0, bad = 0, sample = n < 512 ? n : 512;
    uint64_t any = 0;
    for (i = 0; i + 8 <= sample; i += 8) {  /* all ASCII, the usual case: one quick pass */
        uint64_t word;
        memcpy(&word, data + i, 8);
        any |= word;
    }
    for (; i < sample; i++) {
        any |= data[i];
    }
    if (!(any & ASCII_TOP_BITS)) {
        return 0;
    }
    for (i = 0; i < sample; i++) {
        if (data[i] >= 0xC2) {
            leads++;
            bad += i + 1 >= n || (data[i + 1] & 0xC0) != 0x80;
        }
    }
    return (leads - bad) * 8 >= sample && bad * 4 <= leads;
}

/* The loop: upper-case data[*in_pos..n) into out[*out_pos..out_size), and advance both
 * positions. It keeps room for the rest of the input unchanged, so it stops early only where a
 * mapping longer than its input (U+00DF -> "SS" is not, U+0390 -> 3 code points is) would not
 * leave that room: the caller grows out and calls again. Touches no Python object, so it runs
 * without the GIL. */
static void
upper_utf8(const Table *table, const unsigned char *data, Py_ssize_t n, Py_ssize_t *in_pos,
           unsigned char *out, Py_ssize_t out_size, Py_ssize_t *out_pos)
{
    const unsigned char *in = data + *in_pos, *end = data + n;
    unsigned char *o = out + *out_pos;

    if (looks_dense(in, end - in)) {
        upper_text(table, &in, end, &o, out + out_size);
    }
    else {
        upper_blocks(table, &in, end, &o, out + out_size);
    }
    *in_pos = in - data;
    *out_pos = o - out;
}

/* upper(data: bytes) -> bytes, the function make_upper() returns; capsule holds the table. */
static PyObject *
upper(PyObject *capsule, PyObject *data)
{
    const Table *table;
    PyObject *result;
    Py_ssize_t n, in_pos = 0, out_pos = 0;

    if (!PyBytes_Check(data)) {
        PyErr_Format(PyExc_TypeError, "upper() needs bytes, not %.100s", Py_TYPE(data)->tp_name);
        return NULL;
    }
    table = PyCapsule_GetPointer(capsule, CAPSULE_NAME);
    if (table == NULL) {
        return NULL;
    }
    n = PyBytes_GET_SIZE(data);
    /* As long as the input: most text upper-cases to as many bytes (or fewer). */
    result = PyBytes_FromStringAndSize(NULL, n);
    if (result == NULL) {
        return NULL;
    }
    for (;;) {
        const unsigned char *in = (const unsigned char *)PyBytes_AS_STRING(data);
        unsigned char *out = (unsigned char *)PyBytes_AS_STRING(result);
        Py_ssize_t out_size = PyBytes_GET_SIZE(result);

        if (n - in_pos > RELEASE_GIL_ABOVE) {
            /* The caller's references keep data and this function (so the capsule and the
             * table) alive; result is ours alone. */
            Py_BEGIN_ALLOW_THREADS
            upper_utf8(table, in, n, &in_pos, out, out_size, &out_pos);
            Py_END_ALLOW_THREADS
        }
        else {
            upper_utf8(table, in, n, &in_pos, out, out_size, &out_pos);
        }
        if (in_pos == n) {
            break;
        }
        /* A mapping grew the output: make room for the rest at the worst growth, so this
         * happens at most once per call. */
        if (n - in_pos > (PY_SSIZE_T_MAX - out_pos) / table->growth) {
            Py_DECREF(result);
            return PyErr_NoMemory();
        }
        if (_PyBytes_Resize(&result, out_pos + (n - in_pos) * table->growth) < 0) {
            return NULL;  /* _PyBytes_Resize freed result and set MemoryError */
        }
    }
    if (out_pos != PyBytes_GET_SIZE(result) && _PyBytes_Resize(&result, out_pos) < 0) {
        return NULL;
    }
    return result;
}

/* --- The disconnect command --------------------------------------------------------------
 *
 * The rule (tcp_upper/protocol.py states it above _S_FORMS; its _classify is the oracle): a
 * command line is up to MAX_BLANKS spaces or tabs, the word, up to MAX_BLANKS spaces, tabs or
 * CRs, then "\n". The word is "desconexion" in ASCII letters of either case, except that the S
 * may also be U+017F (C5 BF) and the last O may also be Ó or ó (C3 93, C3 B3) or O/o followed by
 * U+0301 (CC 81) or U+0341 (CD 81).
 *
 * Every spelling has exactly one X (x or X) and blanks are not X, so a command line holds exactly
 * one X: the scan looks for X bytes only, and checks the line around each one. That check reads
 * at most the word and MAX_BLANKS + 1 bytes on either side of it, so any input costs one pass
 * plus a bounded amount per X, whatever its lines look like. */
#define MAX_BLANKS 32

/* Byte c, with ASCII letters folded to lower case, is the letter l (lower case). Setting 0x20
 * only merges each upper-case letter with its lower case (and no other byte with a letter). */
#define IS_LETTER(c, l) (((c) | 0x20u) == (unsigned)(l))

/* data[at..at+len) is the ASCII text word (lower case), letters in either case. */
static int
letters_at(const unsigned char *data, Py_ssize_t at, const char *word, Py_ssize_t len)
{
    for (Py_ssize_t i = 0; i < len; i++) {
        if (!IS_LETTER(data[at + i], (unsigned char)word[i])) {
            return 0;
        }
    }
    return 1;
}

/* The byte at x (data[x] is x or X) is the X of a command line: return where that line
 * starts, or -1. Only a complete line counts (it ends with "\n" inside data[0..n)); offset 0
 * starts a line only when at_line_start. */
static ALWAYS_INLINE Py_ssize_t
command_line_around(const unsigned char *data, Py_ssize_t n, Py_ssize_t x, int at_line_start)
{
    Py_ssize_t start, end, blanks;
    uint64_t word, desconex;

    memcpy(&desconex, "desconex", 8);
    /* Backward: "de", the S ("s" or C5 BF), "cone", then this X. The usual spelling is one
     * comparison of eight bytes with their letters folded (OR 0x20 turns a byte into a given
     * lower-case letter only if it is that letter in either case). */
    if (x < 7) {
        return -1;
    }
    memcpy(&word, data + x - 7, 8);
    if ((word | 0x20 * ONES) == desconex) {
        start = x - 7;
    }
    else if (x >= 8 && letters_at(data, x - 4, "cone", 4) && data[x - 5] == 0xBF
             && data[x - 6] == 0xC5 && letters_at(data, x - 8, "de", 2)) {
        start = x - 8;
    }
    else {
        return -1;
    }
    /* Forward: "i", the last O (o; o + CC 81 or CD 81; C3 93 or C3 B3), "n". The shortest
     * spelling and its newline take data[x+1..x+4]: with those four bytes there, every byte
     * read below up to the N is inside data. */
    end = x + 1;
    if (n - end < 4 || !IS_LETTER(data[end], 'i')) {
        return -1;
    }
    /* The usual spelling ends "ion": then the byte after it must be a blank or the newline
     * (this turns DESCONEXIONES away at once). */
    if (IS_LETTER(data[end + 1], 'o') && IS_LETTER(data[end + 2], 'n')) {
        unsigned char after = data[end + 3];
        if (after != ' ' && after != '\t' && after != '\r' && after != '\n') {
            return -1;
        }
    }
    end++;
    if (IS_LETTER(data[end], 'o')) {
        end += (data[end + 1] == 0xCC || data[end + 1] == 0xCD) && data[end + 2] == 0x81 ? 3 : 1;
    }
    else if (data[end] == 0xC3 && (data[end + 1] == 0x93 || data[end + 1] == 0xB3)) {
        end += 2;
    }
    else {
        return -1;
    }
    if (end >= n || !IS_LETTER(data[end], 'n')) {
        return -1;
    }
    end++;
    /* Trailing blanks (CR among them), at most MAX_BLANKS, then the newline. */
    for (blanks = 0; end < n && blanks <= MAX_BLANKS
         && (data[end] == ' ' || data[end] == '\t' || data[end] == '\r'); blanks++) {
        end++;
    }
    if (blanks > MAX_BLANKS || end >= n || data[end] != '\n') {
        return -1;
    }
    /* Leading blanks (no CR), at most MAX_BLANKS, after a newline or the start of data. */
    for (blanks = 0; start > 0 && blanks <= MAX_BLANKS
         && (data[start - 1] == ' ' || data[start - 1] == '\t'); blanks++) {
        start--;
    }
    if (blanks > MAX_BLANKS) {
        return -1;
    }
    if (start == 0) {
        return at_line_start ? 0 : -1;
    }
    return data[start - 1] == '\n' ? start : -1;
}

/* 0x80 in each byte of v that is zero, 0 in every other byte. Exact: once the top bits are
 * masked off, adding 7F to a byte cannot carry into the next one. */
static uint64_t
zero_bytes(uint64_t v)
{
    return ~(((v & ~ASCII_TOP_BITS) + ~ASCII_TOP_BITS) | v) & ASCII_TOP_BITS;
}

/* 0x80 in each of the eight bytes at p that is the letter l (lower case), in either case. */
static uint64_t
letter_bytes(const unsigned char *p, unsigned char l)
{
    uint64_t word;
    memcpy(&word, p, 8);
    return zero_bytes((word | 0x20 * ONES) ^ (l * ONES));
}

#if defined(USE_SSE2)
/* Bit k: p[k] is an X with an E before it and an I after it (k 0..15; reads p[-1..17)). */
static inline unsigned int
exi_mask(const unsigned char *p)
{
    const __m128i fold = _mm_set1_epi8(0x20);
    __m128i e = _mm_or_si128(_mm_loadu_si128((const __m128i *)(p - 1)), fold);
    __m128i x = _mm_or_si128(_mm_loadu_si128((const __m128i *)p), fold);
    __m128i i = _mm_or_si128(_mm_loadu_si128((const __m128i *)(p + 1)), fold);
    __m128i all = _mm_and_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8('x')),
                                _mm_and_si128(_mm_cmpeq_epi8(e, _mm_set1_epi8('e')),
                                              _mm_cmpeq_epi8(i, _mm_set1_epi8('i'))));
    return (unsigned int)_mm_movemask_epi8(all);
}
#endif

/* The first command line in data[0..n), as find_command_line() answers; runs without the GIL.
 *
 * An X can only be that of a command when it has at least 7 bytes before it and 4 after it
 * ("descone" before, "ion\n" after, in the shortest spelling), and every spelling has "exi"
 * around it. So the X with an E before and an I after are found for many positions at once
 * (64 with SSE2, else 8), as a mask, and only those are checked one by one. Text with few X
 * costs one quick pass, and only lines that hold "exi" (the word, or look-alikes such as
 * DESCONEXIONES) cost a check each. Most text has no X at all, or its first one late: the scan
 * starts there, found by memchr (vectorised further than this loop by the C library). */
static Py_ssize_t
find_command(const unsigned char *data, Py_ssize_t n, int at_line_start)
{
    const unsigned char *small = memchr(data, 'x', (size_t)n);
    const unsigned char *capital = memchr(data, 'X', (size_t)(small ? small - data : n));
    const unsigned char *first = capital ? capital : small;
    Py_ssize_t i, line;

    if (first == NULL) {
        return -1;
    }
    i = first - data < 7 ? 7 : first - data;

#if defined(USE_SSE2)
    /* Sixty-four positions a step, reading data[i-1..i+65): one branch per 64 bytes where
     * text has no "exi", and the candidates in a mask where it has. */
    for (; i + 65 <= n; i += 64) {
        uint64_t candidates = 0;
        for (int k = 0; k < 64; k += 16) {
            candidates |= (uint64_t)exi_mask(data + i + k) << k;
        }
        while (candidates != 0) {
            Py_ssize_t x = i + __builtin_ctzll(candidates);
            candidates &= candidates - 1;
            if ((line = command_line_around(data, n, x, at_line_start)) >= 0) {
                return line;
            }
        }
    }
#endif
    /* Eight positions a step, reading data[i-1..i+9): a word with no X is skipped after one
     * test. */
    for (; i + 9 <= n; i += 8) {
        uint64_t candidates = letter_bytes(data + i, 'x');
        if (candidates == 0) {
            continue;
        }
        candidates &= letter_bytes(data + i - 1, 'e') & letter_bytes(data + i + 1, 'i');
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        candidates = __builtin_bswap64(candidates);  /* byte k of memory in bits 8k..8k+7 */
#endif
        while (candidates != 0) {
            Py_ssize_t x = i + (__builtin_ctzll(candidates) >> 3);
            candidates &= candidates - 1;
            if ((line = command_line_around(data, n, x, at_line_start)) >= 0) {
                return line;
            }
        }
    }
    /* The last few positions, one by one. */
    for (; i < n; i++) {
        if (IS_LETTER(data[i], 'x')) {
            line = command_line_around(data, n, i, at_line_start);
            if (line >= 0) {
                return line;
            }
        }
    }
    return -1;
}

/* find_command_line(data: bytes, at_line_start: bool) -> int */
static PyObject *
find_command_line(PyObject *module, PyObject *args)
{
    PyObject *data;
    int at_line_start;
    Py_ssize_t n, line;
    const unsigned char *bytes;

    (void)module;
    if (!PyArg_ParseTuple(args, "Sp:find_command_line", &data, &at_line_start)) {
        return NULL;
    }
    bytes = (const unsigned char *)PyBytes_AS_STRING(data);
    n = PyBytes_GET_SIZE(data);
    if (n > RELEASE_GIL_ABOVE) {
        /* The caller's reference keeps data alive, and bytes never change. */
        Py_BEGIN_ALLOW_THREADS
        line = find_command(bytes, n, at_line_start);
        Py_END_ALLOW_THREADS
    }
    else {
        line = find_command(bytes, n, at_line_start);
    }
    return PyLong_FromSsize_t(line);
}

/* Not in the module: make_upper() binds it to a table. */
static PyMethodDef upper_def = {
    "upper", (PyCFunction)upper, METH_O,
    "upper(data: bytes) -> bytes\n\n"
    "data.decode('utf-8', 'surrogateescape').upper().encode('utf-8', 'surrogateescape'),\n"
    "in one pass over the bytes, with the table given to make_upper().",
};

/* make_upper(mapping: dict[int, bytes]) -> upper(data: bytes) -> bytes */
static PyObject *
make_upper(PyObject *module, PyObject *mapping)
{
    PyObject *name, *capsule, *function;

    name = PyModule_GetNameObject(module);  /* for the function's __module__ */
    if (name == NULL) {
        return NULL;
    }
    capsule = compile_table(mapping);
    if (capsule == NULL) {
        Py_DECREF(name);
        return NULL;
    }
    function = PyCFunction_NewEx(&upper_def, capsule, name);
    /* The function holds its own references now (or, on error, nothing holds them). */
    Py_DECREF(capsule);
    Py_DECREF(name);
    return function;
}

static PyMethodDef methods[] = {
    {"make_upper", (PyCFunction)make_upper, METH_O,
     "make_upper(mapping: dict[int, bytes]) -> upper(data: bytes) -> bytes\n\n"
     "mapping: every code point below 0x20000 that str.upper() changes, to the UTF-8 of its\n"
     "upper case (1 to 12 bytes)."},
    {"find_command_line", (PyCFunction)find_command_line, METH_VARARGS,
     "find_command_line(data: bytes, at_line_start: bool) -> int\n\n"
     "Offset of the start of the first complete line of data that is the disconnect command\n"
     "(offset 0 starts a line only when at_line_start), or -1."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    /* No module state, so it is safe in every subinterpreter. */
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tcp_upper._speedups",
    .m_doc = "Upper-casing of UTF-8 bytes in C; see tcp_upper/casing.py.",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    int c;
    for (c = 0; c < 256; c++) {
        ascii_upper[c] = (unsigned char)(c >= 'a' && c <= 'z' ? c - 0x20 : c);
    }
    return PyModuleDef_Init(&module_def);
}
