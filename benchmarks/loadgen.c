/* loadgen: closed-loop load generator for newline-framed uppercase servers (tcp_upper benchmarks).
 * Each of CONNS connections sends one batch back to back, waits for its whole reply, checks it
 * byte for byte, records the round trip, repeats for SECONDS. First batches are included.
 *   loadgen HOST PORT CONNS SECONDS MSGLEN DEPTH            batch: DEPTH lines of MSGLEN bytes
 *                                                          ("hola servidor " text), reply = toupper
 *   loadgen HOST PORT CONNS SECONDS MSGLEN DEPTH REQ RSP    batch: the bytes of file REQ, reply:
 *                                                          the bytes of file RSP (DEPTH = lines
 *                                                          per batch, for the requests count)
 * prints: one summary line of key=value pairs. Exit 1 on any mismatch or connection error. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct { int fd; size_t sent_off; double t0; char *rbuf; size_t rlen; } conn_t;
static char *req, *rsp; static size_t reqlen, rsplen;
static double now(void){ struct timespec ts; clock_gettime(CLOCK_MONOTONIC,&ts); return ts.tv_sec+ts.tv_nsec*1e-9; }
static int cmpd(const void*a,const void*b){ double x=*(double*)a,y=*(double*)b; return x<y?-1:x>y; }

static char *slurp(const char *path, size_t *len){
  FILE *f=fopen(path,"rb"); if(!f){ perror(path); exit(2); }
  fseek(f,0,SEEK_END); long n=ftell(f); fseek(f,0,SEEK_SET);
  char *buf=malloc(n>0?n:1); if(n<=0||fread(buf,1,n,f)!=(size_t)n){ fprintf(stderr,"%s: empty or unreadable\n",path); exit(2); }
  fclose(f); *len=(size_t)n; return buf;
}

static void send_batch(int ep, conn_t *c, unsigned idx, long long *errs){
  c->rlen=0; c->t0=now(); ssize_t w=send(c->fd,req,reqlen,MSG_NOSIGNAL); if(w<0){ (*errs)++; w=0; } c->sent_off=w;
  if((size_t)w<reqlen){ struct epoll_event ev={.events=EPOLLIN|EPOLLOUT,.data.u32=idx}; epoll_ctl(ep,EPOLL_CTL_MOD,c->fd,&ev); }
}

int main(int argc,char**argv){
  if(argc!=7&&argc!=9){fprintf(stderr,"usage: %s HOST PORT CONNS SECONDS MSGLEN DEPTH [REQFILE RSPFILE]\n",argv[0]);return 2;}
  const char*host=argv[1]; int port=atoi(argv[2]), nc=atoi(argv[3]); double secs=atof(argv[4]);
  int mlen=atoi(argv[5]), depth=atoi(argv[6]);
  if(argc==9){ req=slurp(argv[7],&reqlen); rsp=slurp(argv[8],&rsplen); }
  else {
    reqlen=(size_t)mlen*depth; rsplen=reqlen; req=malloc(reqlen); rsp=malloc(reqlen);
    for(size_t i=0;i<reqlen;i++){ size_t k=i%mlen; req[i]=k==(size_t)mlen-1?'\n':"hola servidor "[k%14]; rsp[i]=toupper((unsigned char)req[i]); }
  }
  int ep=epoll_create1(0); conn_t*cs=calloc(nc,sizeof(conn_t));
  struct sockaddr_in sa={0}; sa.sin_family=AF_INET; sa.sin_port=htons(port); inet_pton(AF_INET,host,&sa.sin_addr);
  double tstart=now();
  for(int i=0;i<nc;i++){
    int fd=socket(AF_INET,SOCK_STREAM,0); int one=1; setsockopt(fd,IPPROTO_TCP,TCP_NODELAY,&one,sizeof one);
    if(connect(fd,(struct sockaddr*)&sa,sizeof sa)<0){ fprintf(stderr,"connect %d: %s\n",i,strerror(errno)); return 1; }
    fcntl(fd,F_SETFL,O_NONBLOCK); cs[i].fd=fd; cs[i].rbuf=malloc(rsplen+1);
    struct epoll_event ev={.events=EPOLLIN,.data.u32=i}; epoll_ctl(ep,EPOLL_CTL_ADD,fd,&ev);
  }
  double connect_s=now()-tstart;
  size_t cap=1<<22, nl=0; double*lat=malloc(cap*sizeof(double)); long long batches=0, bad=0, errs=0;
  double t0=now(), tend=t0+secs;
  for(int i=0;i<nc;i++) send_batch(ep,&cs[i],i,&errs);
  struct epoll_event evs[256]; int active=nc;
  while(active>0){
    int n=epoll_wait(ep,evs,256,1000); double t=now();
    if(n==0 && t>tend+5){ fprintf(stderr,"stall: no progress\n"); errs++; break; }
    for(int k=0;k<n;k++){ conn_t*c=&cs[evs[k].data.u32];
      if(evs[k].events&EPOLLOUT && c->sent_off<reqlen){ ssize_t w=send(c->fd,req+c->sent_off,reqlen-c->sent_off,MSG_NOSIGNAL); if(w>0)c->sent_off+=w;
        if(c->sent_off==reqlen){ struct epoll_event ev={.events=EPOLLIN,.data.u32=evs[k].data.u32}; epoll_ctl(ep,EPOLL_CTL_MOD,c->fd,&ev);} }
      if(evs[k].events&(EPOLLIN|EPOLLHUP|EPOLLERR)){
        ssize_t r=recv(c->fd,c->rbuf+c->rlen,rsplen+1-c->rlen,0);
        if(r<=0){ if(r<0&&errno==EAGAIN)continue; errs++; epoll_ctl(ep,EPOLL_CTL_DEL,c->fd,NULL); close(c->fd); active--; continue; }
        c->rlen+=r;
        if(c->rlen>=rsplen){ if(c->rlen>rsplen||memcmp(c->rbuf,rsp,rsplen)) bad++;
          if(nl<cap) lat[nl++]=t-c->t0;
          batches++;
          if(t>=tend){ epoll_ctl(ep,EPOLL_CTL_DEL,c->fd,NULL); close(c->fd); active--; continue; }
          send_batch(ep,c,evs[k].data.u32,&errs); }
      } } }
  double el=now()-t0; qsort(lat,nl,sizeof(double),cmpd);
  double p50=nl?lat[nl/2]:0, p99=nl?lat[(size_t)(nl*0.99)]:0, pmax=nl?lat[nl-1]:0;
  printf("conns=%d depth=%d msglen=%d msgs=%lld rps=%.0f MBps=%.1f p50_us=%.0f p99_us=%.0f max_us=%.0f connect_s=%.3f mismatches=%lld errors=%lld\n",
    nc,depth,mlen,batches*depth,batches*depth/el,batches*(double)reqlen/el/1e6,p50*1e6,p99*1e6,pmax*1e6,connect_s,bad,errs);
  return (bad||errs)?1:0;
}
