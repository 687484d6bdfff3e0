// loadgen: epoll HTTP/1.1 keep-alive load generator for streamed (SSE) and JSON Responses API calls.
// usage: loadgen PORT CONC CALLS_PER_CONN N MS JSON_BYTES RAMP_MS
//   CONC connections, started evenly over RAMP_MS; each sends CALLS_PER_CONN calls back to back.
//   N, MS, JSON_BYTES go to the fake upstream as x-n / x-ms / x-json-bytes headers.
// Every SSE event whose data carries "t":<CLOCK_MONOTONIC us> gives a one-way latency sample
// (client receive time - upstream write time) and an inter-arrival gap within its stream.
// Prints one JSON object.
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + ts.tv_nsec / 1000;
}

typedef struct { uint32_t *v; size_t n, cap; } vec_t;
static void push(vec_t *a, uint64_t x) {
    if (a->n == a->cap) { a->cap = a->cap ? a->cap * 2 : 65536; a->v = realloc(a->v, a->cap * sizeof *a->v); }
    a->v[a->n++] = x > 0xffffffffu ? 0xffffffffu : (uint32_t)x;
}
static int cmp32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}
static double pct(vec_t *a, double q) {
    if (!a->n) return -1;
    size_t i = (size_t)(q * a->n);
    if (i >= a->n) i = a->n - 1;
    return a->v[i] / 1000.0;
}

enum { S_IDLE, S_CONNECTING, S_HEAD, S_CSIZE, S_CDATA, S_CCRLF, S_TRAILER, S_CLBODY };
typedef struct {
    int fd, state, calls_left, started;
    uint64_t start_at, t_sent, t_first, last_ev;
    char head[16384];
    int headlen;
    char line[128];
    int linelen;
    long chunk_left, cl_left;
    char *ev;
    size_t evlen, evcap;
    int status, events, completed, first_on_conn;
} cl_t;

static int ep, port, n_events, ms, json_bytes;
static char req[1024];
static int reqlen;
static vec_t lat, gap, ttfb, dur, ttfb_warm;
static long calls_ok, calls_completed, errors, events_total, bytes_total, active;

static void start_conn(cl_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connect(c->fd, (void *)&a, sizeof a);
    c->state = S_CONNECTING;
    c->first_on_conn = 1;
    struct epoll_event e = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
}

static void send_req(cl_t *c) {
    c->t_sent = now_us();
    ssize_t w = write(c->fd, req, reqlen);  // small: one write
    (void)w;
    c->state = S_HEAD;
    c->headlen = 0;
    c->status = 0; c->events = 0; c->completed = 0; c->t_first = 0; c->evlen = 0; c->last_ev = 0;
}

static void conn_fail(cl_t *c) {
    errors++;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->calls_left--;
    if (c->calls_left > 0) start_conn(c);
    else { c->state = S_IDLE; active--; }
}

static void call_done(cl_t *c) {
    uint64_t t = now_us();
    if (c->status == 200) {
        calls_ok++;
        if (c->completed || json_bytes) calls_completed++;
        push(&dur, t - c->t_sent);
    } else errors++;
    c->calls_left--;
    c->first_on_conn = 0;
    if (c->calls_left > 0) send_req(c);
    else {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        c->state = S_IDLE;
        active--;
    }
}

static void on_event(cl_t *c, const char *p, size_t n, uint64_t t) {
    c->events++;
    events_total++;
    const char *q = memmem(p, n, "\"t\":", 4);
    if (q) {
        unsigned long long ts = strtoull(q + 4, NULL, 10);
        push(&lat, t > ts ? t - ts : 0);
    }
    if (c->last_ev) push(&gap, t - c->last_ev);
    c->last_ev = t;
    if (n > 24 && memmem(p, n < 64 ? n : 64, "response.completed", 18)) c->completed = 1;
}

static void body_data(cl_t *c, const char *p, size_t n, uint64_t t) {
    if (!c->t_first) {
        c->t_first = t;
        push(&ttfb, t - c->t_sent);
        if (!c->first_on_conn) push(&ttfb_warm, t - c->t_sent);
    }
    if (c->evlen + n > c->evcap) {
        c->evcap = (c->evlen + n) * 2;
        c->ev = realloc(c->ev, c->evcap);
    }
    memcpy(c->ev + c->evlen, p, n);
    c->evlen += n;
    size_t start = 0;
    for (;;) {
        char *e = memmem(c->ev + start, c->evlen - start, "\n\n", 2);
        if (!e) break;
        size_t end = e - c->ev + 2;
        on_event(c, c->ev + start, end - start, t);
        start = end;
    }
    if (start) { memmove(c->ev, c->ev + start, c->evlen - start); c->evlen -= start; }
}

// feed received bytes through the response state machine; returns -1 on protocol error
static int feed(cl_t *c, const char *p, size_t n, uint64_t t) {
    while (n) {
        switch (c->state) {
        case S_HEAD: {
            size_t take = n;
            if (c->headlen + take > sizeof c->head - 1) take = sizeof c->head - 1 - c->headlen;
            memcpy(c->head + c->headlen, p, take);
            c->headlen += take;
            c->head[c->headlen] = 0;
            char *e = strstr(c->head, "\r\n\r\n");
            if (!e) { if (c->headlen >= (int)sizeof c->head - 1) return -1; p += take; n -= take; break; }
            size_t hl = e + 4 - c->head;
            size_t consumed = hl - (c->headlen - take);
            p += consumed; n -= consumed;
            c->status = atoi(c->head + 9);
            char *cl = strcasestr(c->head, "\ncontent-length:");
            if (strcasestr(c->head, "\ntransfer-encoding: chunked")) { c->state = S_CSIZE; c->linelen = 0; }
            else if (cl) {
                c->cl_left = atol(cl + 16);
                c->state = S_CLBODY;
                if (!c->cl_left) call_done(c);
            } else return -1;
            break;
        }
        case S_CLBODY: {
            size_t take = n < (size_t)c->cl_left ? n : (size_t)c->cl_left;
            if (!c->t_first) {
                c->t_first = t;
                push(&ttfb, t - c->t_sent);
                if (!c->first_on_conn) push(&ttfb_warm, t - c->t_sent);
            }
            c->cl_left -= take; p += take; n -= take;
            if (!c->cl_left) call_done(c);
            break;
        }
        case S_CSIZE:
        case S_TRAILER: {
            const char *e = memchr(p, '\n', n);
            size_t take = e ? (size_t)(e - p + 1) : n;
            if (c->linelen + take < sizeof c->line) memcpy(c->line + c->linelen, p, take);
            c->linelen += take; p += take; n -= take;
            if (!e) break;
            c->line[c->linelen < (int)sizeof c->line ? c->linelen : (int)sizeof c->line - 1] = 0;
            if (c->state == S_TRAILER) {
                c->linelen = 0;
                if (c->line[0] == '\r' || c->line[0] == '\n') call_done(c);
                break;
            }
            long sz = strtol(c->line, NULL, 16);
            c->linelen = 0;
            if (sz == 0) c->state = S_TRAILER;
            else { c->chunk_left = sz; c->state = S_CDATA; }
            break;
        }
        case S_CDATA: {
            size_t take = n < (size_t)c->chunk_left ? n : (size_t)c->chunk_left;
            body_data(c, p, take, t);
            c->chunk_left -= take; p += take; n -= take;
            if (!c->chunk_left) { c->state = S_CCRLF; c->linelen = 0; }
            break;
        }
        case S_CCRLF: {
            const char *e = memchr(p, '\n', n);
            if (!e) { p += n; n = 0; break; }
            size_t take = e - p + 1;
            p += take; n -= take;
            c->state = S_CSIZE;
            break;
        }
        default:
            return -1;  // bytes while idle
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 8) { fprintf(stderr, "usage: loadgen PORT CONC CALLS N MS JSON_BYTES RAMP_MS\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    port = atoi(argv[1]);
    int conc = atoi(argv[2]), calls = atoi(argv[3]);
    n_events = atoi(argv[4]); ms = atoi(argv[5]); json_bytes = atoi(argv[6]);
    int ramp_ms = atoi(argv[7]);
    const char *body = json_bytes ? "{\"model\":\"gpt-5-codex\",\"stream\":false,\"input\":\"bench\"}"
                                  : "{\"model\":\"gpt-5-codex\",\"stream\":true,\"input\":\"bench\"}";
    reqlen = snprintf(req, sizeof req,
                      "POST /v1/responses HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
                      "authorization: Bearer bench\r\nx-n: %d\r\nx-ms: %d\r\nx-json-bytes: %d\r\n"
                      "content-length: %zu\r\n\r\n%s",
                      port, n_events, ms, json_bytes, strlen(body), body);
    ep = epoll_create1(0);
    cl_t *cs = calloc(conc, sizeof *cs);
    uint64_t t0 = now_us();
    for (int i = 0; i < conc; i++) {
        cs[i].calls_left = calls;
        cs[i].start_at = t0 + (conc > 1 ? (uint64_t)ramp_ms * 1000 * i / conc : 0);
        cs[i].state = S_IDLE;
    }
    active = conc;
    int next_start = 0;
    static char buf[262144];
    struct epoll_event evs[512];
    while (active > 0) {
        uint64_t now = now_us();
        while (next_start < conc && cs[next_start].start_at <= now) start_conn(&cs[next_start++]);
        int timeout = 1000;
        if (next_start < conc) {
            uint64_t d = cs[next_start].start_at;
            timeout = d <= now ? 0 : (int)((d - now + 999) / 1000);
        }
        int k = epoll_wait(ep, evs, 512, timeout);
        for (int i = 0; i < k; i++) {
            cl_t *c = evs[i].data.ptr;
            if (c->state == S_IDLE) continue;
            if (c->state == S_CONNECTING) {
                int err = 0; socklen_t l = sizeof err;
                getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
                if (err || (evs[i].events & (EPOLLERR | EPOLLHUP))) { conn_fail(c); continue; }
                struct epoll_event e = {.events = EPOLLIN, .data.ptr = c};
                epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
                send_req(c);
                continue;
            }
            for (;;) {
                ssize_t r = read(c->fd, buf, sizeof buf);
                if (r > 0) {
                    bytes_total += r;
                    if (feed(c, buf, r, now_us()) < 0) { conn_fail(c); break; }
                    if (c->state == S_IDLE) break;
                    if (r < (ssize_t)sizeof buf) break;
                    continue;
                }
                if (r < 0 && errno == EAGAIN) break;
                conn_fail(c);  // EOF or error mid-call
                break;
            }
        }
    }
    double wall = (now_us() - t0) / 1e6;
    qsort(lat.v, lat.n, 4, cmp32); qsort(gap.v, gap.n, 4, cmp32); qsort(ttfb.v, ttfb.n, 4, cmp32);
    qsort(dur.v, dur.n, 4, cmp32); qsort(ttfb_warm.v, ttfb_warm.n, 4, cmp32);
    printf("{\"conc\":%d,\"calls\":%d,\"n\":%d,\"ms\":%d,\"json_bytes\":%d,\"calls_ok\":%ld,\"calls_completed\":%ld,"
           "\"errors\":%ld,\"events\":%ld,\"bytes\":%ld,\"wall_s\":%.3f,\"events_per_s\":%.1f,"
           "\"ttfb_p50\":%.3f,\"ttfb_p99\":%.3f,\"ttfb_warm_p50\":%.3f,\"ttfb_warm_p99\":%.3f,"
           "\"lat_p50\":%.3f,\"lat_p90\":%.3f,\"lat_p99\":%.3f,\"lat_max\":%.3f,"
           "\"gap_p50\":%.3f,\"gap_p99\":%.3f,\"gap_max\":%.3f,\"dur_p50\":%.3f,\"dur_p99\":%.3f,\"dur_max\":%.3f}\n",
           conc, calls, n_events, ms, json_bytes, calls_ok, calls_completed, errors, events_total, bytes_total, wall,
           events_total / wall, pct(&ttfb, .5), pct(&ttfb, .99), pct(&ttfb_warm, .5), pct(&ttfb_warm, .99),
           pct(&lat, .5), pct(&lat, .9), pct(&lat, .99), pct(&lat, 1.0), pct(&gap, .5), pct(&gap, .99), pct(&gap, 1.0),
           pct(&dur, .5), pct(&dur, .99), pct(&dur, 1.0));
    return 0;
}
