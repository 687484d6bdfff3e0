// fakeup: a single-threaded epoll fake LLM upstream (Responses API shape), for relay benchmarks.
// usage: fakeup PORT   (0: any free port; the first line printed is "listening on <port>")
// Per request headers: x-n (delta events, default 300), x-ms (spacing ms, default 5; 0 = as fast as possible),
// x-json-bytes (>0: a non-streamed JSON body of about that size, usage at the end).
// Each SSE event is one HTTP chunk; every event's JSON carries "t": CLOCK_MONOTONIC microseconds when written.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXC 4096
static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + ts.tv_nsec / 1000;
}

typedef struct {
    int fd, used;
    char in[65536];
    int inlen;
    int streaming;  // 1 = SSE in progress
    int n_total, n_sent, ms, stage;  // stage 0: created, 1: deltas, 2: completed sent
    uint64_t next_due;
    char *out;
    size_t outlen, outcap, outoff;
    const char *ext;  // external body (json), written after out
    size_t extlen, extoff;
    int epollout;
} conn_t;

static conn_t *conns[MAXC * 4];
static int ep, maxfd;

static void out_reserve(conn_t *c, size_t add) {
    if (c->outoff && c->outoff == c->outlen) c->outoff = c->outlen = 0;
    if (c->outlen + add > c->outcap) {
        if (c->outoff) {  // compact
            memmove(c->out, c->out + c->outoff, c->outlen - c->outoff);
            c->outlen -= c->outoff;
            c->outoff = 0;
        }
        if (c->outlen + add > c->outcap) {
            size_t cap = c->outcap ? c->outcap : 8192;
            while (cap < c->outlen + add) cap *= 2;
            c->out = realloc(c->out, cap);
            c->outcap = cap;
        }
    }
}
static void out_add(conn_t *c, const char *p, size_t n) {
    out_reserve(c, n);
    memcpy(c->out + c->outlen, p, n);
    c->outlen += n;
}
static void add_chunk(conn_t *c, const char *p, size_t n) {
    char h[32];
    int hn = snprintf(h, sizeof h, "%zx\r\n", n);
    out_reserve(c, hn + n + 2);
    memcpy(c->out + c->outlen, h, hn);
    memcpy(c->out + c->outlen + hn, p, n);
    memcpy(c->out + c->outlen + hn + n, "\r\n", 2);
    c->outlen += hn + n + 2;
}

static const char *USAGE =
    "\"usage\":{\"input_tokens\":1200,\"input_tokens_details\":{\"cached_tokens\":800},\"output_tokens\":300,"
    "\"output_tokens_details\":{\"reasoning_tokens\":100},\"total_tokens\":1500}";

static void add_event(conn_t *c, int kind, int seq) {
    char ev[1024];
    int n;
    uint64_t t = now_us();
    if (kind == 0)
        n = snprintf(ev, sizeof ev,
                     "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_f\","
                     "\"object\":\"response\",\"model\":\"gpt-5-codex\",\"status\":\"in_progress\"},\"t\":%llu}\n\n",
                     (unsigned long long)t);
    else if (kind == 1)
        n = snprintf(ev, sizeof ev,
                     "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\","
                     "\"delta\":\"tok%05d \",\"t\":%llu}\n\n",
                     seq % 100000, (unsigned long long)t);
    else
        n = snprintf(ev, sizeof ev,
                     "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_f\","
                     "\"object\":\"response\",\"model\":\"gpt-5-codex\",\"status\":\"completed\",%s},\"t\":%llu}\n\n",
                     USAGE, (unsigned long long)t);
    add_chunk(c, ev, n);
}

// cached JSON bodies by size
static struct { size_t size; char *body; size_t len; } jcache[8];
static int njc;
static const char *json_body(size_t size, size_t *len) {
    for (int i = 0; i < njc; i++)
        if (jcache[i].size == size) { *len = jcache[i].len; return jcache[i].body; }
    const char *head = "{\"id\":\"resp_f\",\"object\":\"response\",\"model\":\"gpt-5-codex\",\"status\":\"completed\","
                       "\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"";
    char tail[512];
    snprintf(tail, sizeof tail, "\"}]}],%s}", USAGE);
    size_t hl = strlen(head), tl = strlen(tail);
    size_t fill = size > hl + tl ? size - hl - tl : 1;
    char *b = malloc(hl + fill + tl);
    memcpy(b, head, hl);
    for (size_t i = 0; i < fill; i++) b[hl + i] = (i % 64 == 63) ? ' ' : 'a' + (i % 26);
    memcpy(b + hl + fill, tail, tl);
    if (njc < 8) { jcache[njc].size = size; jcache[njc].body = b; jcache[njc].len = hl + fill + tl; njc++; }
    *len = hl + fill + tl;
    return b;
}

static void close_conn(conn_t *c) {
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conns[c->fd] = NULL;
    free(c->out);
    free(c);
}

static void set_out(conn_t *c, int want) {
    if (want == c->epollout) return;
    struct epoll_event e = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
    c->epollout = want;
}

// returns -1 when the connection died
static int flush_out(conn_t *c) {
    while (c->outoff < c->outlen) {
        ssize_t w = write(c->fd, c->out + c->outoff, c->outlen - c->outoff);
        if (w < 0) {
            if (errno == EAGAIN) { set_out(c, 1); return 0; }
            return -1;
        }
        c->outoff += w;
    }
    c->outoff = c->outlen = 0;
    while (c->ext && c->extoff < c->extlen) {
        ssize_t w = write(c->fd, c->ext + c->extoff, c->extlen - c->extoff);
        if (w < 0) {
            if (errno == EAGAIN) { set_out(c, 1); return 0; }
            return -1;
        }
        c->extoff += w;
    }
    c->ext = NULL;
    set_out(c, 0);
    return 0;
}

static long hdr_num(const char *h, const char *name, long dflt) {
    size_t nl = strlen(name);
    for (const char *p = h; (p = strcasestr(p, name)); p += nl) {
        if (p > h && p[-1] == '\n' && p[nl] == ':') return strtol(p + nl + 1, NULL, 10);
    }
    return dflt;
}

static int pending_work(conn_t *c) { return c->streaming || c->outoff < c->outlen || c->ext; }

// produce stream output that is due; returns -1 on death
static int pump(conn_t *c, uint64_t now) {
    if (!c->streaming) return 0;
    if (c->ms == 0) {
        // as fast as the socket takes it: keep up to 256 KiB queued in userspace
        for (;;) {
            while (c->streaming && (c->outlen - c->outoff) < 262144) {
                if (c->stage == 0) { add_event(c, 0, 0); c->stage = 1; }
                else if (c->n_sent < c->n_total) add_event(c, 1, c->n_sent++);
                else { add_event(c, 2, 0); out_add(c, "0\r\n\r\n", 5); c->streaming = 0; }
            }
            if (flush_out(c) < 0) return -1;
            if (!c->streaming || c->epollout) return 0;  // done, or the socket is full: EPOLLOUT resumes
        }
    }
    int wrote = 0;
    while (c->streaming && now >= c->next_due) {
        if (c->stage == 0) { add_event(c, 0, 0); c->stage = 1; }
        else if (c->n_sent < c->n_total) add_event(c, 1, c->n_sent++);
        else { add_event(c, 2, 0); out_add(c, "0\r\n\r\n", 5); c->streaming = 0; }
        c->next_due = now + (uint64_t)c->ms * 1000;
        wrote = 1;
    }
    if (wrote && !c->epollout) return flush_out(c);
    return 0;
}

// parse complete requests in c->in; start their responses
static int handle_input(conn_t *c) {
    while (!pending_work(c)) {
        c->in[c->inlen] = 0;
        char *end = strstr(c->in, "\r\n\r\n");
        if (!end) return 0;
        size_t hlen = end + 4 - c->in;
        long cl = hdr_num(c->in, "content-length", 0);
        if ((long)(c->inlen - hlen) < cl) return 0;
        long n = hdr_num(c->in, "x-n", 300), ms = hdr_num(c->in, "x-ms", 5), jb = hdr_num(c->in, "x-json-bytes", 0);
        int is_models = strncmp(c->in, "GET ", 4) == 0;
        // consume the request
        size_t used = hlen + cl;
        memmove(c->in, c->in + used, c->inlen - used);
        c->inlen -= used;
        if (is_models) {
            const char *b = "{\"object\":\"list\",\"data\":[{\"id\":\"gpt-5-codex\"}]}";
            char h[256];
            int hn = snprintf(h, sizeof h, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %zu\r\n\r\n", strlen(b));
            out_add(c, h, hn);
            out_add(c, b, strlen(b));
        } else if (jb > 0) {
            size_t len;
            const char *b = json_body((size_t)jb, &len);
            char h[256];
            int hn = snprintf(h, sizeof h, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %zu\r\n\r\n", len);
            out_add(c, h, hn);
            c->ext = b; c->extlen = len; c->extoff = 0;
        } else {
            const char *h = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
                            "transfer-encoding: chunked\r\n\r\n";
            out_add(c, h, strlen(h));
            c->streaming = 1; c->n_total = (int)n; c->n_sent = 0; c->ms = (int)ms; c->stage = 0;
            c->next_due = 0;  // created event right away
        }
        if (flush_out(c) < 0) return -1;
        if (c->streaming && pump(c, now_us()) < 0) return -1;
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: fakeup PORT\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (void *)&a, sizeof a) || listen(ls, 4096)) { perror("bind/listen"); return 1; }
    ep = epoll_create1(0);
    struct epoll_event e = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &e);
    socklen_t alen = sizeof a;
    getsockname(ls, (void *)&a, &alen);
    printf("listening on %d\n", ntohs(a.sin_port));
    fflush(stdout);
    struct epoll_event evs[256];
    for (;;) {
        // timeout: until the earliest due timed stream
        uint64_t now = now_us(), due = UINT64_MAX;
        for (int fd = 0; fd <= maxfd; fd++) {
            conn_t *c = conns[fd];
            if (c && c->streaming && c->ms > 0 && c->next_due < due) due = c->next_due;
        }
        int timeout = due == UINT64_MAX ? 1000 : (due <= now ? 0 : (int)((due - now + 999) / 1000));
        int k = epoll_wait(ep, evs, 256, timeout);
        for (int i = 0; i < k; i++) {
            conn_t *c = evs[i].data.ptr;
            if (!c) {
                int fd;
                while ((fd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (fd >= MAXC * 4) { close(fd); continue; }
                    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *nc = calloc(1, sizeof *nc);
                    nc->fd = fd;
                    if (fd > maxfd) maxfd = fd;
                    conns[fd] = nc;
                    struct epoll_event ne = {.events = EPOLLIN, .data.ptr = nc};
                    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ne);
                }
                continue;
            }
            if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                ssize_t r = read(c->fd, c->in + c->inlen, sizeof(c->in) - 1 - c->inlen);
                if (r == 0 || (r < 0 && errno != EAGAIN)) { close_conn(c); continue; }
                if (r > 0) c->inlen += r;
            }
            if (evs[i].events & EPOLLOUT) {
                if (flush_out(c) < 0) { close_conn(c); continue; }
                if (c->streaming && c->ms == 0 && pump(c, now_us()) < 0) { close_conn(c); continue; }
            }
            if (handle_input(c) < 0) { close_conn(c); continue; }
        }
        now = now_us();
        for (int fd = 0; fd <= maxfd; fd++) {
            conn_t *c = conns[fd];
            if (c && c->streaming && c->ms > 0) {
                if (pump(c, now) < 0) { close_conn(c); continue; }
            }
            if (c && conns[fd] && !pending_work(c) && c->inlen) {
                if (handle_input(c) < 0) close_conn(c);
            }
        }
    }
}
