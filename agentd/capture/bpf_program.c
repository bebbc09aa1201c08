// Shadowplane workload capture: kernel-side aggregation per workload cgroup, tracepoints only.
//
// User space maps each workload cgroup (by its cgroup v2 id, the inode of its directory in the unified
// hierarchy) to a small slot number; every counter and log2 histogram lives in per-CPU arrays indexed by
// slot, so the hot path is array lookups, never a per-event message to user space. User space reads the
// cumulative values once per interval and ships deltas.
//
// Build-time constants (passed as -D by the loader): MAX_SLOTS, SAMPLE_EVERY, the cgroup filter's size, the
// offsets of the walk to the current cgroup id (read from the running kernel's BTF), and one HAVE_* flag per
// way of capturing a feature that this kernel's tracepoint formats allow (agentd/capture/kernel_features.py
// decides them from the running kernel's formats and BTF, never from its version; each flag's code reads only
// the tracepoints and fields that table lists for it).
//
// What a process the agent does not capture pays: the bare cost of the attached tracepoints and one cgroup
// test (a pointer walk and an array probe, no helper but bpf_get_current_task_btf), nothing else: no task
// storage, no map update. sys_exit (latency) is attached only in timing windows (agentd/latency_windows.py).

#include <uapi/linux/ptrace.h>
#include <uapi/linux/in6.h>  // struct sockaddr_in6: older tcp:tcp_probe formats size saddr/daddr with it

#ifdef DECLARE_SK_RST_REASON
// tcp:tcp_send_reset carries this enum on kernels newer than the headers bcc compiles against.
enum sk_rst_reason { SK_RST_REASON_UNKNOWN_TO_HEADERS = 0 };
#endif

#define NR_SYSCALLS 512      // syscall numbers >= this are counted in the last entry
#define LAT_BUCKETS 32
#define NO_SLOT 0xffffffff

// Every struct below is the one definition of its map's layout: the loader exports each map's fields (names,
// offsets, lengths) with the map, and the agent decodes values by field name (agentd/capture/map_layout.py).

// Events that could not be accounted, by reason: exported as dropped_events, keyed by these field names.
struct miss_counts {
    u64 task_storage_full;           // could not attach per-task state (allocation failed)
    u64 block_inflight_table_full;   // in-flight block request table full: request not timed
    u64 tcp_socket_table_full;       // socket ownership table full: socket events not attributed
};

struct sys_slot {
    u64 count[NR_SYSCALLS];
    u64 lat_ns[LAT_BUCKETS];   // log2 of nanoseconds, sampled
    u64 sample_tick;           // this CPU's calls of this workload since the last timed one
};

struct io_slot {
    u64 read_ops;
    u64 write_ops;
    u64 read_bytes;
    u64 write_bytes;
    u64 discard_ops;
    u64 discard_bytes;
    u64 lat_us[LAT_BUCKETS];
};

struct tcp_slot {
    u64 state[16];            // by new state (TCP_ESTABLISHED = 1 ... TCP_NEW_SYN_RECV = 12)
    u64 srtt_us[LAT_BUCKETS];
    u64 retransmits;
    u64 resets_sent;
    u64 resets_received;
};

// Per-task state of a captured task, created only when one of its syscalls is timed: the entry timestamp of
// the syscall being timed and the timing window it was taken in.
struct task_cache {
    u64 enter_ns;
    u32 slot;
    u32 window;
};

// The cgroup filter: an open-addressed table of the captured cgroups' v2 ids (the inode of each directory in
// the unified hierarchy), each with its workload's slot. A plain array, so a lookup is inlined by the
// verifier into a bounds check and an add; user space places each id within FILTER_PROBES entries of its hash
// (agentd/capture/cgroup_filter.py, the one other definition of this hash). An empty entry (cgid 0) ends a
// probe: most uncaptured tasks stop at the first entry.
struct filter_entry {
    u64 cgid;
    u32 slot;
    u32 pad;
};

BPF_ARRAY(cgroup_filter, struct filter_entry, FILTER_SIZE);  // written by user space
// The current timing window's number (0: no window open): an entry timestamp is used only by the sys_exit of
// the same window, so a syscall that started before sys_exit was attached is never timed from a stale stamp.
BPF_ARRAY(timing_window, u32, 1);
#ifdef HAVE_SYSCALLS
BPF_TASK_STORAGE(task_state, struct task_cache);  // needs kernel BTF, as bpf_get_current_task_btf() does
#endif
BPF_PERCPU_ARRAY(sys_stats, struct sys_slot, MAX_SLOTS);
BPF_PERCPU_ARRAY(io_stats, struct io_slot, MAX_SLOTS);
BPF_PERCPU_ARRAY(tcp_stats, struct tcp_slot, MAX_SLOTS);
BPF_PERCPU_ARRAY(misses, struct miss_counts, 1);

static __always_inline struct miss_counts *miss_counts(void) {
    u32 zero = 0;
    return misses.lookup(&zero);
}

#define COUNT_MISS(reason)                         \
    do {                                           \
        struct miss_counts *m_ = miss_counts();    \
        if (m_)                                    \
            m_->reason++;                          \
    } while (0)

// An index into an array of n (a power of two) entries. The clamp alone is correct C, but the compiler may
// turn it into a form older verifiers (6.1: "R0 unbounded memory access") cannot follow; the mask, kept by
// the empty asm (the compiler would drop it as a no-op after the clamp), is a bound every verifier tracks.
static __always_inline u64 bounded(u64 i, u64 n) {
    if (i >= n)
        i = n - 1;
    asm volatile("" : "+r"(i));
    return i & (n - 1);
}

static __always_inline u64 log2_bucket(u64 v) {
    return bounded(bpf_log2l(v), LAT_BUCKETS);
}

// The current task's cgroup v2 id: what bpf_get_current_cgroup_id() returns, read by walking
// current->cgroups->dfl_cgrp->kn->id with the offsets this kernel's BTF gives. Loads through the BTF pointer
// bpf_get_current_task_btf() returns cost a few cycles each; a helper call costs tens of nanoseconds, paid by
// every syscall of every process on the host.
static __always_inline u64 current_cgroup_id(void) {
#ifdef CGROUP_ID_WALK
    char *task = (char *)bpf_get_current_task_btf();
    char *cset = *(char **)(task + TASK_CGROUPS_OFF);
    char *cgrp = *(char **)(cset + CSS_SET_DFL_CGRP_OFF);
    char *kn = *(char **)(cgrp + CGROUP_KN_OFF);
    return *(u64 *)(kn + KERNFS_NODE_ID_OFF);
#else
    return bpf_get_current_cgroup_id();
#endif
}

// Slot of a cgroup id, NO_SLOT when it is not captured. The hash: Fibonacci hashing of the id, so the
// consecutive ids of sibling cgroups land far apart.
static __always_inline u32 slot_of(u64 cg) {
    u32 h = (u32)((cg * 0x9E3779B97F4A7C15ULL) >> (64 - FILTER_BITS));
#pragma unroll
    for (u32 i = 0; i < FILTER_PROBES; i++) {
        u32 idx = (h + i) & (FILTER_SIZE - 1);
        struct filter_entry *e = cgroup_filter.lookup(&idx);
        if (!e || e->cgid == 0)
            return NO_SLOT;
        if (e->cgid == cg)
            return e->slot;
    }
    return NO_SLOT;
}

// Slot of the current task's cgroup: the test every program makes first.
static __always_inline u32 current_slot(void) {
    return slot_of(current_cgroup_id());
}

// ---- syscalls -----------------------------------------------------------------------------------

#ifdef HAVE_SYSCALLS
RAW_TRACEPOINT_PROBE(sys_enter) {
    u32 slot = current_slot();
    if (slot >= MAX_SLOTS)
        return 0;
    struct sys_slot *st = sys_stats.lookup(&slot);
    if (!st)
        return 0;
    // syscall numbers >= NR_SYSCALLS are counted in the last entry
    st->count[bounded((u64)ctx->args[1], NR_SYSCALLS)]++;
    // Latency: one call in SAMPLE_EVERY of this workload on this CPU is timed, and only while a timing window
    // is open (sys_exit attached); the counts above stay exact.
    if (++st->sample_tick < SAMPLE_EVERY)
        return 0;
    st->sample_tick = 0;
    u32 zero = 0;
    u32 *window = timing_window.lookup(&zero);
    if (!window || !*window)
        return 0;
    struct task_cache *tc = task_state.task_storage_get(
        (struct task_struct *)bpf_get_current_task_btf(), 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
    if (!tc) {
        COUNT_MISS(task_storage_full);
        return 0;
    }
    tc->slot = slot;
    tc->window = *window;
    tc->enter_ns = bpf_ktime_get_ns();
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_exit) {
    if (current_slot() == NO_SLOT)
        return 0;
    struct task_cache *tc = task_state.task_storage_get(
        (struct task_struct *)bpf_get_current_task_btf(), 0, 0);
    if (!tc || !tc->enter_ns)
        return 0;
    u64 delta = bpf_ktime_get_ns() - tc->enter_ns;
    tc->enter_ns = 0;
    u32 zero = 0;
    u32 *window = timing_window.lookup(&zero);
    if (!window || *window != tc->window)
        return 0;  // stamped in an earlier window: this exit is not that call's
    u32 slot = tc->slot;
    if (slot >= MAX_SLOTS)
        return 0;
    struct sys_slot *st = sys_stats.lookup(&slot);
    if (st)
        st->lat_ns[log2_bucket(delta)]++;
    return 0;
}
#endif  // HAVE_SYSCALLS

// ---- block I/O ------------------------------------------------------------------------------------
// Completions run in interrupt context, so the owner is recorded when the request starts, in the
// submitting task's context, keyed by (device, sector).

struct rq_key {
    u32 dev;
    u32 pad;
    u64 sector;
};

struct rq_val {
    u64 issue_ns;
    u32 slot;
    u32 pad;
};

BPF_HASH(inflight, struct rq_key, struct rq_val, 16384);

static __always_inline void remember_request(u32 dev, u64 sector, u32 slot) {
    struct rq_key key = {.dev = dev, .sector = sector};
    struct rq_val val = {.issue_ns = 0, .slot = slot};
    if (inflight.update(&key, &val) != 0)
        COUNT_MISS(block_inflight_table_full);
}

#ifdef HAVE_BLOCK_IO_START
TRACEPOINT_PROBE(block, block_io_start) {
    u32 slot = current_slot();
    if (slot != NO_SLOT)
        remember_request(args->dev, args->sector, slot);
    return 0;
}
#endif

#ifdef HAVE_BLOCK_RQ_INSERT
// Without block_io_start (before 6.5): a request the submitter does not issue itself is inserted into the
// queue in its context, and issued later by a kernel worker. The first owner seen is kept (a requeue
// inserts again, from a worker).
TRACEPOINT_PROBE(block, block_rq_insert) {
    struct rq_key key = {.dev = args->dev, .sector = args->sector};
    if (inflight.lookup(&key))
        return 0;
    u32 slot = current_slot();
    if (slot != NO_SLOT)
        remember_request(args->dev, args->sector, slot);
    return 0;
}
#endif

#ifdef HAVE_BLOCK_RQ
TRACEPOINT_PROBE(block, block_rq_issue) {
    struct rq_key key = {.dev = args->dev, .sector = args->sector};
    struct rq_val *val = inflight.lookup(&key);
    if (!val) {
        // No start event (older kernel, or a request started before we attached): the issuing task is the
        // best owner we have.
        u32 slot = current_slot();
        if (slot == NO_SLOT)
            return 0;
        remember_request(args->dev, args->sector, slot);
        val = inflight.lookup(&key);
        if (!val)
            return 0;
    }
    val->issue_ns = bpf_ktime_get_ns();
    return 0;
}

TRACEPOINT_PROBE(block, block_rq_complete) {
    struct rq_key key = {.dev = args->dev, .sector = args->sector};
    struct rq_val *val = inflight.lookup(&key);
    if (!val)
        return 0;
    u64 issued = val->issue_ns;
    u32 slot = val->slot;
    inflight.delete(&key);
    if (!issued || slot >= MAX_SLOTS)
        return 0;
    struct io_slot *io = io_stats.lookup(&slot);
    if (!io)
        return 0;
    u64 bytes = (u64)args->nr_sector << 9;
    // rwbs: an optional leading 'F' (pre-flush), then the operation: R, W, D (discard), N (none)...
    char op = args->rwbs[0] == 'F' ? args->rwbs[1] : args->rwbs[0];
    if (op == 'W') {
        io->write_ops++;
        io->write_bytes += bytes;
    } else if (op == 'R') {
        io->read_ops++;
        io->read_bytes += bytes;
    } else if (op == 'D') {
        io->discard_ops++;
        io->discard_bytes += bytes;
    } else {
        return 0;  // flushes carry no data; their latency would skew the data requests'
    }
    io->lat_us[log2_bucket((bpf_ktime_get_ns() - issued) / 1000)]++;
    return 0;
}
#endif  // HAVE_BLOCK_RQ

// ---- TCP --------------------------------------------------------------------------------------------
// Most TCP events fire in softirq context, where the current task is whoever was interrupted. A socket is
// attributed to the cgroup of the task that last touched it from process context (connect, listen, and
// send/receive where the kernel has a tracepoint for them) and every later event on that socket is counted
// there.

#ifdef HAVE_INET_SOCK_SET_STATE
BPF_HASH(sock_slots, u64, u32, 65536);

static __always_inline void own_socket(u64 sk) {
    u32 slot = current_slot();
    if (slot == NO_SLOT)
        return;
    u32 *have = sock_slots.lookup(&sk);
    if (have && *have == slot)
        return;
    if (sock_slots.update(&sk, &slot) != 0)
        COUNT_MISS(tcp_socket_table_full);
}

static __always_inline struct tcp_slot *slot_stats(u32 *slot) {
    if (!slot)
        return 0;
    u32 s = *slot;
    if (s >= MAX_SLOTS)
        return 0;
    return tcp_stats.lookup(&s);
}

static __always_inline struct tcp_slot *socket_stats(u64 sk) {
    return slot_stats(sock_slots.lookup(&sk));
}

#define IPPROTO_TCP_ 6
#define AF_INET_ 2
#define AF_INET6_ 10
#define TCP_ESTABLISHED_ 1
#define TCP_SYN_SENT_ 2
#define TCP_CLOSE_ 7
#define TCP_LISTEN_ 10

#ifdef HAVE_TCP_PROBE_TUPLE
// Where tcp:tcp_probe has no skaddr (before 6.10), its RTT samples are matched to a socket by the
// connection's ports and addresses, which sock:inet_sock_set_state and tcp:tcp_rcv_space_adjust also carry:
// each owned socket's tuple is remembered when it is established or receives, forgotten when it closes.
struct tcp_tuple {
    u16 sport;  // host order, as the tracepoints store them
    u16 dport;
    u8 saddr[16];  // IPv6, or IPv4 mapped (::ffff:a.b.c.d) as the tracepoints' saddr_v6/daddr_v6 hold it
    u8 daddr[16];
};

BPF_HASH(tuple_slots, struct tcp_tuple, u32, 65536);

#define TUPLE_FROM_V6_FIELDS(key, a)                              \
    do {                                                          \
        __builtin_memset(&(key), 0, sizeof(key));                 \
        (key).sport = (a)->sport;                                 \
        (key).dport = (a)->dport;                                 \
        __builtin_memcpy((key).saddr, (a)->saddr_v6, 16);         \
        __builtin_memcpy((key).daddr, (a)->daddr_v6, 16);         \
    } while (0)

static __always_inline void remember_tuple(struct tcp_tuple *key, u64 sk) {
    u32 *slot = sock_slots.lookup(&sk);
    if (!slot)
        return;
    u32 s = *slot;
    u32 *have = tuple_slots.lookup(key);
    if (have && *have == s)
        return;
    if (tuple_slots.update(key, &s) != 0)
        COUNT_MISS(tcp_socket_table_full);
}
#endif

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP_)
        return 0;
    u64 sk = (u64)args->skaddr;
    int state = args->newstate;
    // connect() and listen() run in the owner's context.
    if (state == TCP_SYN_SENT_ || state == TCP_LISTEN_)
        own_socket(sk);
    struct tcp_slot *t = socket_stats(sk);
    if (t)
        t->state[state & 15]++;
#ifdef HAVE_TCP_PROBE_TUPLE
    // At SYN_SENT the local port may not be chosen yet; by ESTABLISHED the tuple is complete.
    if (state == TCP_ESTABLISHED_ || state == TCP_CLOSE_) {
        struct tcp_tuple key;
        TUPLE_FROM_V6_FIELDS(key, args);
        if (state == TCP_ESTABLISHED_)
            remember_tuple(&key, sk);
        else
            tuple_slots.delete(&key);
    }
#endif
    if (state == TCP_CLOSE_)
        sock_slots.delete(&sk);
    return 0;
}

#ifdef HAVE_SOCK_LENGTH
TRACEPOINT_PROBE(sock, sock_send_length) {
    if (args->protocol == IPPROTO_TCP_)
        own_socket((u64)args->sk);
    return 0;
}

TRACEPOINT_PROBE(sock, sock_recv_length) {
    if (args->protocol == IPPROTO_TCP_)
        own_socket((u64)args->sk);
    return 0;
}
#endif

#if defined(HAVE_TCP_RCV_SPACE_ADJUST) || defined(HAVE_TCP_PROBE_TUPLE)
// Runs in the receiving task's context (tcp_recvmsg): owns accepted sockets where sock:sock_recv_length is
// missing, and records the tuple of a socket owned after it was established.
TRACEPOINT_PROBE(tcp, tcp_rcv_space_adjust) {
    u64 sk = (u64)args->skaddr;
#ifdef HAVE_TCP_RCV_SPACE_ADJUST
    own_socket(sk);
#endif
#ifdef HAVE_TCP_PROBE_TUPLE
    struct tcp_tuple key;
    TUPLE_FROM_V6_FIELDS(key, args);
    remember_tuple(&key, sk);
#endif
    return 0;
}
#endif

#ifdef HAVE_TCP_DESTROY_SOCK
TRACEPOINT_PROBE(tcp, tcp_destroy_sock) {
    u64 sk = (u64)args->skaddr;
    sock_slots.delete(&sk);
    return 0;
}
#endif

#ifdef HAVE_TCP_PROBE_SK
TRACEPOINT_PROBE(tcp, tcp_probe) {
    struct tcp_slot *t = socket_stats((u64)args->skaddr);
    if (t)
        t->srtt_us[log2_bucket(args->srtt)]++;
    return 0;
}
#endif

#ifdef HAVE_TCP_PROBE_TUPLE
TRACEPOINT_PROBE(tcp, tcp_probe) {
    // saddr/daddr hold a struct sockaddr_in or sockaddr_in6 (by family); sport/dport are in host order, as
    // in the tuples recorded above.
    struct tcp_tuple key;
    __builtin_memset(&key, 0, sizeof(key));
    key.sport = args->sport;
    key.dport = args->dport;
    if (args->family == AF_INET6_) {
        __builtin_memcpy(key.saddr, args->saddr + 8, 16);  // sin6_addr
        __builtin_memcpy(key.daddr, args->daddr + 8, 16);
    } else if (args->family == AF_INET_) {
        key.saddr[10] = key.saddr[11] = key.daddr[10] = key.daddr[11] = 0xff;
        __builtin_memcpy(key.saddr + 12, args->saddr + 4, 4);  // sin_addr
        __builtin_memcpy(key.daddr + 12, args->daddr + 4, 4);
    } else {
        return 0;
    }
    struct tcp_slot *t = slot_stats(tuple_slots.lookup(&key));
    if (t)
        t->srtt_us[log2_bucket(args->srtt)]++;
    return 0;
}
#endif

#ifdef HAVE_TCP_RETRANSMIT
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    struct tcp_slot *t = socket_stats((u64)args->skaddr);
    if (t)
        t->retransmits++;
    return 0;
}
#endif

#ifdef HAVE_TCP_SEND_RESET
TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    struct tcp_slot *t = socket_stats((u64)args->skaddr);
    if (t)
        t->resets_sent++;
    return 0;
}
#endif

#ifdef HAVE_TCP_RECEIVE_RESET
TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    struct tcp_slot *t = socket_stats((u64)args->skaddr);
    if (t)
        t->resets_received++;
    return 0;
}
#endif
#endif  // HAVE_INET_SOCK_SET_STATE
