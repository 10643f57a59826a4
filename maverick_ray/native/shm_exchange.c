/* All-to-all between the ranks of one host through a shared memory segment.
 *
 * Segment layout (every block 64-byte aligned):
 *   Header            magic, world, ring bytes, a token the creator picks
 *   RankCtl[W]        per rank: wake word (a futex), sleepers, pid, pid namespace
 *   RingCtl[W * W]    per ordered pair s -> d: head (bytes s has written), tail (bytes d has read)
 *   data[W * W][ring] per ordered pair, a ring of `ring` bytes
 * Each pair is a single-producer single-consumer byte stream. In every exchange each rank
 * appends, for each peer, an 8-byte length and then that many bytes; the receiver checks the
 * length against what it expects, so ranks that disagree get an error, not garbage. Messages
 * longer than a ring stream through it while the peer drains it.
 *
 * Waiting: spin for a few microseconds, then sleep on the rank's own wake word (futex) in short
 * slices, checking the deadline and whether the peers still live between slices. Whoever moves
 * a head or tail bumps the other side's wake word, and wakes it if it sleeps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define MAGIC 0x6d72736830317831ULL
#define ALIGN 64
#define SPIN_NS 30000          /* spin this long before sleeping */
#define SLICE_NS 10000000      /* one futex sleep at most; between slices check peers and the deadline */

enum { OK = 0, TIMED_OUT = 1, PEER_GONE = 2, LENGTH_MISMATCH = 3, BAD_SEGMENT = 4 };

typedef struct { uint64_t magic, world, ring, token; } Header;
typedef struct { _Atomic uint32_t wake; _Atomic uint32_t sleepers; int64_t pid; uint64_t pidns; } RankCtl;
typedef struct { _Atomic uint64_t head; char pad0[ALIGN - 8]; _Atomic uint64_t tail; char pad1[ALIGN - 8]; } RingCtl;

static size_t up(size_t n) { return (n + ALIGN - 1) / ALIGN * ALIGN; }
static size_t rank_off(void) { return up(sizeof(Header)); }
static size_t ring_ctl_off(int64_t w) { return rank_off() + (size_t)w * up(sizeof(RankCtl)); }
static size_t data_off(int64_t w) { return ring_ctl_off(w) + (size_t)(w * w) * sizeof(RingCtl); }

int64_t shm_exchange_segment_bytes(int64_t world, int64_t ring) {
    return (int64_t)(data_off(world) + (size_t)(world * world) * (size_t)ring);
}

static Header *hdr(void *b) { return (Header *)b; }
static RankCtl *rk(void *b, int64_t r) { return (RankCtl *)((char *)b + rank_off() + (size_t)r * up(sizeof(RankCtl))); }
static RingCtl *rc(void *b, int64_t w, int64_t s, int64_t d) { return (RingCtl *)((char *)b + ring_ctl_off(w)) + s * w + d; }
static char *rdata(void *b, int64_t w, int64_t ring, int64_t s, int64_t d) {
    return (char *)b + data_off(w) + (size_t)(s * w + d) * (size_t)ring;
}

/* Creator: lay out an all-zero segment. */
void shm_exchange_init(void *base, int64_t world, int64_t ring, uint64_t token) {
    memset(base, 0, (size_t)shm_exchange_segment_bytes(world, ring));
    Header *h = hdr(base);
    h->world = (uint64_t)world, h->ring = (uint64_t)ring, h->token = token;
    atomic_thread_fence(memory_order_release);
    h->magic = MAGIC;
}

/* Every rank: check the segment is the one the creator announced and register this process. */
int shm_exchange_attach(void *base, int64_t world, int64_t ring, uint64_t token, int64_t rank, int64_t pid,
                        uint64_t pidns) {
    Header *h = hdr(base);
    atomic_thread_fence(memory_order_acquire);
    if (h->magic != MAGIC || h->world != (uint64_t)world || h->ring != (uint64_t)ring || h->token != token ||
        rank < 0 || rank >= world)
        return BAD_SEGMENT;
    rk(base, rank)->pid = pid, rk(base, rank)->pidns = pidns;
    return OK;
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void notify(RankCtl *r) {
    atomic_fetch_add(&r->wake, 1);
    if (atomic_load(&r->sleepers))
        syscall(SYS_futex, &r->wake, FUTEX_WAKE, 1, NULL, NULL, 0);
}

/* Copies n bytes into the ring at stream position pos (wrapping). */
static void ring_put(char *ring_data, int64_t ring, uint64_t pos, const char *src, int64_t n) {
    int64_t at = (int64_t)(pos % (uint64_t)ring), first = n < ring - at ? n : ring - at;
    memcpy(ring_data + at, src, (size_t)first);
    if (n > first) memcpy(ring_data, src + first, (size_t)(n - first));
}

static void ring_get(const char *ring_data, int64_t ring, uint64_t pos, char *dst, int64_t n) {
    int64_t at = (int64_t)(pos % (uint64_t)ring), first = n < ring - at ? n : ring - at;
    memcpy(dst, ring_data + at, (size_t)first);
    if (n > first) memcpy(dst + first, ring_data, (size_t)(n - first));
}

/* A peer is gone when it shares our pid namespace and its pid no longer exists. */
static int peer_gone(void *base, int64_t peer, uint64_t my_ns) {
    RankCtl *p = rk(base, peer);
    return p->pid > 0 && p->pidns == my_ns && kill((pid_t)p->pid, 0) == -1 && errno == ESRCH;
}

/* One all-to-all. send_len[d] bytes from send + send_off[d] go to rank d; recv_len[s] bytes from
 * rank s land at recv + recv_off[s]. Returns OK, or TIMED_OUT / PEER_GONE / LENGTH_MISMATCH with
 * the peer in *bad (and for a mismatch the length that peer sent in *bad_len). */
int shm_exchange_all_to_all(void *base, int64_t rank, const char *send, const int64_t *send_off,
                            const int64_t *send_len, char *recv, const int64_t *recv_off, const int64_t *recv_len,
                            double timeout_s, int64_t *bad, int64_t *bad_len) {
    Header *h = hdr(base);
    const int64_t W = (int64_t)h->world, ring = (int64_t)h->ring;
    RankCtl *me = rk(base, rank);
    if (send_len[rank] != recv_len[rank]) {
        *bad = rank, *bad_len = send_len[rank];
        return LENGTH_MISMATCH;
    }
    memcpy(recv + recv_off[rank], send + send_off[rank], (size_t)send_len[rank]);
    int64_t sent[W], got[W];      /* stream bytes moved so far, header included */
    uint64_t in_len[W];           /* the length header read from each source */
    int64_t pending = 0;
    for (int64_t p = 0; p < W; p++) {
        sent[p] = got[p] = (p == rank) ? -1 : 0;
        in_len[p] = 0;
        pending += (p != rank) * 2;
    }
    const int64_t deadline = now_ns() + (int64_t)(timeout_s * 1e9);
    for (;;) {
        uint32_t seen = atomic_load(&me->wake);
        int progressed = 0;
        for (int64_t i = 1; i < W; i++) {
            int64_t d = (rank + i) % W, s = (rank - i + W) % W;
            if (sent[d] >= 0) {   /* send to d: [length][bytes] */
                RingCtl *c = rc(base, W, rank, d);
                uint64_t head = atomic_load_explicit(&c->head, memory_order_relaxed);
                int64_t room = ring - (int64_t)(head - atomic_load_explicit(&c->tail, memory_order_acquire));
                int64_t total = 8 + send_len[d], moved = 0;
                char *rd = rdata(base, W, ring, rank, d);
                while (room > 0 && sent[d] < total) {
                    int64_t n;
                    if (sent[d] < 8) {
                        uint64_t len = (uint64_t)send_len[d];
                        n = 8 - sent[d] < room ? 8 - sent[d] : room;
                        ring_put(rd, ring, head + moved, (const char *)&len + sent[d], n);
                    } else {
                        n = total - sent[d] < room ? total - sent[d] : room;
                        ring_put(rd, ring, head + moved, send + send_off[d] + (sent[d] - 8), n);
                    }
                    sent[d] += n, moved += n, room -= n;
                }
                if (moved) {
                    atomic_store_explicit(&c->head, head + (uint64_t)moved, memory_order_release);
                    notify(rk(base, d));
                    progressed = 1;
                }
                if (sent[d] == total) sent[d] = -1, pending--;
            }
            if (got[s] >= 0) {    /* receive from s */
                RingCtl *c = rc(base, W, s, rank);
                uint64_t tail = atomic_load_explicit(&c->tail, memory_order_relaxed);
                int64_t avail = (int64_t)(atomic_load_explicit(&c->head, memory_order_acquire) - tail), moved = 0;
                const char *rd = rdata(base, W, ring, s, rank);
                while (avail > 0) {
                    int64_t n;
                    if (got[s] < 8) {
                        n = 8 - got[s] < avail ? 8 - got[s] : avail;
                        ring_get(rd, ring, tail + moved, (char *)&in_len[s] + got[s], n);
                        if (got[s] + n == 8 && in_len[s] != (uint64_t)recv_len[s]) {
                            *bad = s, *bad_len = (int64_t)in_len[s];
                            return LENGTH_MISMATCH;
                        }
                    } else {
                        int64_t left = 8 + recv_len[s] - got[s];
                        if (left == 0) break;
                        n = left < avail ? left : avail;
                        ring_get(rd, ring, tail + moved, recv + recv_off[s] + (got[s] - 8), n);
                    }
                    got[s] += n, moved += n, avail -= n;
                    if (got[s] == 8 + recv_len[s]) break;
                }
                if (moved) {
                    atomic_store_explicit(&c->tail, tail + (uint64_t)moved, memory_order_release);
                    notify(rk(base, s));
                    progressed = 1;
                }
                if (got[s] == 8 + recv_len[s]) got[s] = -1, pending--;
            }
        }
        if (pending == 0) return OK;
        if (progressed) continue;
        /* Nothing to do until a peer moves: spin briefly, then sleep in slices. */
        int64_t t0 = now_ns(), t = t0;
        while (atomic_load_explicit(&me->wake, memory_order_acquire) == seen && t - t0 < SPIN_NS) {
            for (int k = 0; k < 64; k++) CPU_RELAX();
            t = now_ns();
        }
        if (atomic_load(&me->wake) != seen) continue;
        atomic_fetch_add(&me->sleepers, 1);
        if (atomic_load(&me->wake) == seen) {
            struct timespec slice = {0, SLICE_NS};
            syscall(SYS_futex, &me->wake, FUTEX_WAIT, seen, &slice, NULL, 0);
        }
        atomic_fetch_sub(&me->sleepers, 1);
        if (atomic_load(&me->wake) != seen) continue;
        for (int64_t p = 0; p < W; p++) {
            if ((sent[p] >= 0 || got[p] >= 0) && peer_gone(base, p, me->pidns)) {
                *bad = p, *bad_len = 0;
                return PEER_GONE;
            }
        }
        if (now_ns() > deadline) {
            for (int64_t p = 0; p < W; p++)
                if (sent[p] >= 0 || got[p] >= 0) { *bad = p; break; }
            *bad_len = 0;
            return TIMED_OUT;
        }
    }
}
