/* CPL3 part of the test guest: each vCPU writes its own slice of the working set in passes
 * and verifies it after every pass against the shadow table of expected versions.
 *
 * Page p of the working set (at WS_VA + p * 4096) holds {PAGE_TAG(p), version} in its first 16
 * bytes and again in its last 16, so a page copied half-old/half-new is caught. shadow[p] (at
 * SHADOW_VA) is the version last written. Both live in guest RAM and migrate with it: a page
 * or a shadow entry the migration loses shows up as a mismatch. */
#include "guest.h"

#define MAX_CORRUPT_LINES_PER_PASS 4

static volatile uint64_t total_errors;
static volatile uint32_t vcpus_done;

struct vcpu_state {
  uint32_t cpu;
  uint64_t lo, n;        /* slice: pages [lo, lo + n) */
  uint64_t writes, errors;
  uint64_t last_tsc, last_report;
  uint64_t rng;
  uint64_t ticks_per_page_fp; /* 48.16 fixed point; 0 = unpaced */
  uint64_t due_fp;            /* TSC (<< 16) when the next write may happen */
};

static inline uint64_t* shadow(void) { return (uint64_t*)SHADOW_VA; }
static inline volatile uint64_t* page(uint64_t p) { return (volatile uint64_t*)(WS_VA + p * PAGE_SIZE); }

static void tsc_check(struct vcpu_state* s, uint64_t now) {
  if (now < s->last_tsc) {
    s->errors++;
    struct line l;
    line_init(&l);
    line_str(&l, "kvmig-guest: error vcpu=");
    line_u64(&l, s->cpu);
    line_str(&l, " tsc went backwards from ");
    line_u64(&l, s->last_tsc);
    line_str(&l, " to ");
    line_u64(&l, now);
    line_emit(&l);
  }
  s->last_tsc = now;
}

/* rate=MIBPS: each write waits for its slot. After a long stall (VM paused, migration
 * downtime) the schedule restarts from now instead of bursting to catch up. */
static void pace(struct vcpu_state* s) {
  if (!s->ticks_per_page_fp) return;
  uint64_t now = rdtsc();
  tsc_check(s, now);
  uint64_t now_fp = now << 16, slack_fp = (cfg.tsc_khz * 100) << 16; /* 100 ms */
  if (now_fp > s->due_fp + slack_fp) s->due_fp = now_fp;
  while ((rdtsc() << 16) < s->due_fp) cpu_relax();
  s->due_fp += s->ticks_per_page_fp;
}

static inline void write_page(struct vcpu_state* s, uint64_t p) {
  pace(s);
  uint64_t v = ++shadow()[p];
  volatile uint64_t* pg = page(p);
  pg[0] = PAGE_TAG(p);
  pg[1] = v;
  pg[510] = PAGE_TAG(p);
  pg[511] = v;
  s->writes++;
}

static inline uint64_t next_rand(struct vcpu_state* s) { /* xorshift64* */
  s->rng ^= s->rng >> 12;
  s->rng ^= s->rng << 25;
  s->rng ^= s->rng >> 27;
  return s->rng * 0x2545F4914F6CDD1Dull;
}

static inline uint64_t below(struct vcpu_state* s, uint64_t n) {
  return (uint64_t)(((unsigned __int128)next_rand(s) * n) >> 64);
}

/* One pass writes as many pages as the slice holds, in the configured pattern. */
static void write_pass(struct vcpu_state* s, bool sweep) {
  uint64_t lo = s->lo, n = s->n;
  if (sweep || cfg.pattern == PATTERN_SEQ) {
    for (uint64_t i = 0; i < n; i++) write_page(s, lo + i);
  } else if (cfg.pattern == PATTERN_RANDOM) {
    for (uint64_t i = 0; i < n; i++) write_page(s, lo + below(s, n));
  } else {
    uint64_t hot = n * cfg.hot_pct / 100;
    if (hot == 0) hot = 1;
    uint64_t cold = n - hot;
    for (uint64_t i = 0; i < n; i++) {
      bool to_hot = cold == 0 || below(s, 100) < cfg.hotp_pct;
      write_page(s, to_hot ? lo + below(s, hot) : lo + hot + below(s, cold));
    }
  }
}

static void verify_pass(struct vcpu_state* s) {
  unsigned lines = 0;
  for (uint64_t p = s->lo; p < s->lo + s->n; p++) {
    uint64_t want = shadow()[p], tag = PAGE_TAG(p);
    volatile uint64_t* pg = page(p);
    uint64_t h_tag = pg[0], h_ver = pg[1], t_tag = pg[510], t_ver = pg[511];
    if (h_tag == tag && h_ver == want && t_tag == tag && t_ver == want) continue;
    s->errors++;
    if (lines++ >= MAX_CORRUPT_LINES_PER_PASS) continue;
    /* got = the first wrong field: header version, tail version, else the wrong tag. */
    uint64_t got = h_ver != want ? h_ver : t_ver != want ? t_ver : h_tag != tag ? h_tag : t_tag;
    struct line l;
    line_init(&l);
    line_str(&l, "kvmig-guest: corrupt vcpu=");
    line_u64(&l, s->cpu);
    line_str(&l, " page=");
    line_u64(&l, p);
    line_str(&l, " want=");
    line_u64(&l, want);
    line_str(&l, " got=");
    line_u64(&l, got);
    line_emit(&l);
  }
}

static void pass_line(struct vcpu_state* s, uint64_t n, uint64_t tsc) {
  struct line l;
  line_init(&l);
  line_str(&l, "kvmig-guest: pass vcpu=");
  line_u64(&l, s->cpu);
  line_str(&l, " n=");
  line_u64(&l, n);
  line_str(&l, " writes=");
  line_u64(&l, s->writes);
  line_str(&l, " errors=");
  line_u64(&l, s->errors);
  line_str(&l, " tsc=");
  line_u64(&l, tsc);
  line_emit(&l);
}

static __attribute__((noreturn)) void finish(struct vcpu_state* s) {
  if (s->cpu == 0 && cfg.disk) {
    disk_final();
    disk_pass_line(cfg.passes);
    s->errors += disk_errors();
  }
  __atomic_add_fetch(&total_errors, s->errors, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&vcpus_done, 1, __ATOMIC_SEQ_CST);
  if (s->cpu != 0)
    for (;;) cpu_relax(); /* CPL3 cannot hlt; vCPU 0 ends the VM shortly */
  while (__atomic_load_n(&vcpus_done, __ATOMIC_SEQ_CST) < cfg.vcpus) cpu_relax();
  uint64_t errors = __atomic_load_n(&total_errors, __ATOMIC_SEQ_CST);
  struct line l;
  line_init(&l);
  line_str(&l, "kvmig-guest: done result=");
  line_str(&l, errors ? "fail" : "pass");
  line_str(&l, " passes=");
  line_u64(&l, cfg.passes);
  line_str(&l, " errors=");
  line_u64(&l, errors);
  line_emit(&l);
  guest_exit(errors ? EXIT_FAIL : EXIT_PASS);
}

void user_main(uint64_t cpu) {
  struct vcpu_state s = {0};
  s.cpu = (uint32_t)cpu;
  s.lo = cpu * cfg.ws_pages / cfg.vcpus;
  s.n = (cpu + 1) * cfg.ws_pages / cfg.vcpus - s.lo;
  s.last_tsc = s.last_report = rdtsc();
  s.rng = (cpu + 1) * 0x9E3779B97F4A7C15ull ^ s.last_tsc;
  if (!s.rng) s.rng = 1;
  if (cfg.rate_mibps) {
    /* pages/s for this vCPU = rate * 256 / vcpus; ticks/page = tsc_hz / that. */
    uint64_t pps = cfg.rate_mibps * 256;
    s.ticks_per_page_fp = ((cfg.tsc_khz * 1000) << 16) / pps * cfg.vcpus;
    s.due_fp = s.last_tsc << 16;
  }
  bool disk = cpu == 0 && cfg.disk;
  if (disk) disk_user_init(s.rng);
  uint64_t report_ticks = cfg.report_ms * cfg.tsc_khz;
  for (uint64_t n = 1;; n++) {
    if (n == 1 || !cfg.idle) write_pass(&s, n == 1); /* pass 1 initializes every page */
    verify_pass(&s);
    if (disk) disk_pass(n == 1 || !cfg.idle);
    uint64_t now = rdtsc();
    tsc_check(&s, now);
    bool last = cfg.passes && n == cfg.passes;
    if (!last && (now - s.last_report >= report_ticks)) {
      pass_line(&s, n, now);
      if (disk) disk_pass_line(n);
      s.last_report = now;
    } else if (last) {
      pass_line(&s, n, now);
    }
    if (last) finish(&s);
  }
}
