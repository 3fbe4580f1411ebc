/* The test guest's disk workload (cmdline disk=1): vCPU 0 writes blocks of its disk, each
 * stamped with its index, a version and a checksum over the whole block, keeps the latest
 * version of every block in a shadow table in guest RAM, and reads blocks back to verify
 * them. A write the disk lost, a stale block (one that did not move with the VM), a torn
 * block or a block changed behind the guest's back is reported as "disk corrupt".
 *
 * The device is kvmig's paravirtual "kblk" (docs/block-device.md; the numbers below must
 * match kvm/block_ring.h). disk_init runs at CPL0 (port reads); everything else at CPL3,
 * where the only port access is the doorbell `out` (done by the #GP handler on kvm-pvm).
 * The guest polls descriptor statuses: no interrupts. */
#include "guest.h"

#define BLK_PORT 0x0c80
#define BLK_MAGIC 0x6b6c626bu
#define BLK_VERSION 1
#define REG_MAGIC 0x00
#define REG_VERSION 0x04
#define REG_CAP_LO 0x08
#define REG_CAP_HI 0x0c
#define REG_RING_LO 0x10
#define REG_RING_HI 0x14
#define REG_RING_SIZE 0x18
#define REG_DOORBELL 0x1c
#define OP_READ 0
#define OP_WRITE 1
#define OP_FLUSH 2
#define ST_OK 0
#define ST_BAD 2
#define ST_UNSUPPORTED 3
#define ST_PENDING 0xff

/* dqd= requests in flight per batch = ring entries (default 8). More in flight keeps the
 * guest's rate up when each request waits longer on the host (a disk shared with a migration's
 * bulk copy): throughput is about dqd * dblock / latency. */
#define DQD_MAX 64
#define DPOOL_BYTES (8 * 1024 * 1024) /* dqd * dblock at most (config.c checks) */
#define DSHADOW_MAX (256 * 1024)  /* blocks tracked: 16 GiB of disk at 64 KiB */
#define DTAG(b) (0x6b64000000000000ull | (uint64_t)(b))
#define MAX_CORRUPT_LINES_PER_PASS 4
/* Well past the host's pause drain limit (5 s, kvm/block_device.h) plus a migration's setup: a
 * test that holds the host I/O that long must see the pause fail, not the guest give up. */
#define REQUEST_TIMEOUT_MS 30000

struct blk_desc {
  volatile uint8_t op;
  volatile uint8_t status;
  uint16_t reserved;
  uint32_t len;
  uint64_t sector, addr, cookie;
};

static struct {
  volatile uint32_t used;
  uint32_t pad[15];
  struct blk_desc d[DQD_MAX];
} ring __attribute__((aligned(4096)));
static uint8_t dpool[DPOOL_BYTES] __attribute__((aligned(4096)));
static inline uint8_t* dbuf(unsigned i) { return dpool + (uint64_t)i * cfg.dblock; }
static uint64_t dshadow[DSHADOW_MAX];

static uint64_t nblocks, sectors;
static uint32_t avail; /* free-running; request i of a batch is in slot (avail + i) % dqd */

/* Request i of the batch being built, or, after run_batch, of the batch just completed. */
static uint32_t batch_base;
static inline struct blk_desc* req(unsigned i) { return &ring.d[(batch_base + i) & (cfg.dqd - 1)]; }

struct disk_state {
  uint64_t writes, reads, errors;
  uint64_t rng, wcursor, vcursor;
  uint64_t ticks_per_block_fp, due_fp;
  unsigned lines;
};
static struct disk_state ds;

static inline uint32_t inl(uint16_t port) {
  uint32_t v;
  __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}

/* CPL0, at boot: find the device, set up the ring. NULL or a boot error. */
const char* disk_init(void) {
  if (inl(BLK_PORT + REG_MAGIC) != BLK_MAGIC) return "disk=1 but no kvmig block device (run with --disk)";
  if (inl(BLK_PORT + REG_VERSION) != BLK_VERSION) return "unsupported kvmig block device version";
  sectors = inl(BLK_PORT + REG_CAP_LO) | (uint64_t)inl(BLK_PORT + REG_CAP_HI) << 32;
  nblocks = sectors * 512 / cfg.dblock;
  if (nblocks == 0) return "disk smaller than dblock=";
  if (nblocks > DSHADOW_MAX) nblocks = DSHADOW_MAX;
  uint64_t pa = (uint64_t)&ring; /* the image is identity-mapped */
  outl(BLK_PORT + REG_RING_LO, (uint32_t)pa);
  outl(BLK_PORT + REG_RING_HI, (uint32_t)(pa >> 32));
  outl(BLK_PORT + REG_RING_SIZE, (uint32_t)cfg.dqd);
  if (inl(BLK_PORT + REG_RING_SIZE) != cfg.dqd || inl(BLK_PORT + REG_DOORBELL) != 0) return "block device refused the ring";
  struct line l;
  line_init(&l);
  line_str(&l, "kvmig-guest: disk start blocks=");
  line_u64(&l, nblocks);
  line_str(&l, " block=");
  line_u64(&l, cfg.dblock);
  line_str(&l, " pattern=");
  line_str(&l, pattern_name(cfg.dpattern));
  line_str(&l, " rate=");
  if (cfg.drate_mibps) line_u64(&l, cfg.drate_mibps);
  else line_str(&l, "max");
  line_emit(&l);
  return 0;
}

static inline uint64_t next_rand(void) { /* xorshift64* */
  ds.rng ^= ds.rng >> 12;
  ds.rng ^= ds.rng << 25;
  ds.rng ^= ds.rng >> 27;
  return ds.rng * 0x2545F4914F6CDD1Dull;
}
static inline uint64_t below(uint64_t n) { return (uint64_t)(((unsigned __int128)next_rand() * n) >> 64); }

/* Block layout (64-bit words): [0] DTAG(b), [1] version, [2] checksum of every other word,
 * [3..] a fill derived from (b, version), so any mix of two versions fails the checksum. */
static uint64_t checksum(const uint64_t* w, uint64_t words) {
  uint64_t c = 0xcbf29ce484222325ull ^ w[0] ^ (w[1] << 1);
  for (uint64_t i = 3; i < words; i++) c = (c ^ w[i]) * 0x100000001b3ull;
  return c;
}

static void stamp(uint64_t* w, uint64_t b, uint64_t version) {
  uint64_t words = cfg.dblock / 8, x = (b + 1) * 0x9E3779B97F4A7C15ull ^ version * 0xD1B54A32D192ED03ull;
  if (!x) x = 1;
  w[0] = DTAG(b);
  w[1] = version;
  for (uint64_t i = 3; i < words; i++) {
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    w[i] = x;
  }
  w[2] = checksum(w, words);
}

static void corrupt_line(uint64_t b, uint64_t want, uint64_t got, const char* why) {
  ds.errors++;
  if (ds.lines++ >= MAX_CORRUPT_LINES_PER_PASS) return;
  struct line l;
  line_init(&l);
  line_str(&l, "kvmig-guest: disk corrupt block=");
  line_u64(&l, b);
  line_str(&l, " want=");
  line_u64(&l, want);
  line_str(&l, " got=");
  line_u64(&l, got);
  line_str(&l, " why=");
  line_str(&l, why);
  line_emit(&l);
}

/* Publishes descriptors [0, n) of this batch, rings once, waits for all. The device may
 * complete them in any order; every slot is free again when this returns. */
static void run_batch(unsigned n) {
  __asm__ volatile("" ::: "memory"); /* descriptors before the doorbell (x86 keeps store order) */
  avail += n;
  outl(BLK_PORT + REG_DOORBELL, avail);
  uint64_t deadline = rdtsc() + REQUEST_TIMEOUT_MS * cfg.tsc_khz;
  for (unsigned i = 0; i < n; i++) {
    while (req(i)->status == ST_PENDING) {
      if (rdtsc() > deadline) {
        print_error("disk request timed out", 0);
        guest_exit(EXIT_FAIL);
      }
      cpu_relax();
    }
  }
}

static void set_desc(unsigned i, uint8_t op, uint64_t sector, uint64_t addr, uint32_t len) {
  struct blk_desc* d = req(i);
  d->status = ST_PENDING;
  d->len = len;
  d->sector = sector;
  d->addr = addr;
  d->cookie = i;
  d->op = op;
}

static void pace(void) {
  if (!ds.ticks_per_block_fp) return;
  uint64_t now_fp = rdtsc() << 16, slack_fp = (cfg.tsc_khz * 100) << 16; /* 100 ms */
  if (now_fp > ds.due_fp + slack_fp) ds.due_fp = now_fp;
  while ((rdtsc() << 16) < ds.due_fp) cpu_relax();
  ds.due_fp += ds.ticks_per_block_fp;
}

static uint64_t pick_block(void) {
  if (cfg.dpattern == PATTERN_SEQ) return ds.wcursor++ % nblocks;
  if (cfg.dpattern == PATTERN_RANDOM) return below(nblocks);
  uint64_t hot = nblocks * cfg.dhot_pct / 100;
  if (hot == 0) hot = 1;
  uint64_t cold = nblocks - hot;
  return cold == 0 || below(100) < 90 ? below(hot) : hot + below(cold);
}

/* Writes `count` blocks in batches of dqd; a block appears at most once per batch, since two
 * writes of one block in flight together may land in either order. */
static void write_blocks(uint64_t count) {
  while (count > 0) {
    uint64_t blocks[DQD_MAX];
    unsigned n = 0;
    batch_base = avail;
    for (; n < cfg.dqd && count > 0; count--) {
      uint64_t b = pick_block();
      bool dup = false;
      for (unsigned j = 0; j < n; j++) dup |= blocks[j] == b;
      if (dup) continue;
      pace();
      stamp((uint64_t*)dbuf(n), b, dshadow[b] + 1);
      set_desc(n, OP_WRITE, b * (cfg.dblock / 512), (uint64_t)dbuf(n), (uint32_t)cfg.dblock);
      blocks[n++] = b;
    }
    if (n == 0) continue;
    run_batch(n);
    for (unsigned i = 0; i < n; i++) {
      if (req(i)->status == ST_OK) {
        dshadow[blocks[i]]++; /* only a completed write has a known version */
        ds.writes++;
      } else {
        /* The write may or may not have reached the disk: the block's content is unknown. */
        corrupt_line(blocks[i], dshadow[blocks[i]] + 1, req(i)->status, "status");
        dshadow[blocks[i]] = 0;
      }
    }
  }
}

static void check_block(const uint64_t* w, uint64_t b) {
  uint64_t want = dshadow[b], words = cfg.dblock / 8;
  if (w[1] != want) corrupt_line(b, want, w[1], "version");
  else if (w[0] != DTAG(b)) corrupt_line(b, want, w[0], "tag");
  else if (w[2] != checksum(w, words)) corrupt_line(b, want, w[2], "checksum");
}

/* Reads back up to `count` blocks that have a known version, from the rolling cursor on
 * (all of them when count >= nblocks); blocks never written hold whatever the image had. */
static void verify_blocks(uint64_t count) {
  uint64_t scanned = 0;
  while (count > 0 && scanned < nblocks) {
    uint64_t blocks[DQD_MAX];
    unsigned n = 0;
    batch_base = avail;
    for (; n < cfg.dqd && count > 0 && scanned < nblocks; scanned++) {
      uint64_t b = ds.vcursor++ % nblocks;
      if (!dshadow[b]) continue;
      set_desc(n, OP_READ, b * (cfg.dblock / 512), (uint64_t)dbuf(n), (uint32_t)cfg.dblock);
      blocks[n++] = b;
      count--;
    }
    if (n == 0) break;
    run_batch(n);
    for (unsigned i = 0; i < n; i++) {
      ds.reads++;
      if (req(i)->status != ST_OK) corrupt_line(blocks[i], dshadow[blocks[i]], req(i)->status, "status");
      else check_block((const uint64_t*)dbuf(i), blocks[i]);
    }
  }
}

static void flush_disk(void) {
  batch_base = avail;
  set_desc(0, OP_FLUSH, 0, 0, 0);
  run_batch(1);
  if (req(0)->status != ST_OK) corrupt_line(0, 0, req(0)->status, "status");
}

/* dbad=1: requests the device must refuse without touching guest RAM or the disk. */
static void bad_requests(void) {
  uint64_t canary = 0x5a5a5a5a5a5a5a5aull;
  uint64_t* w = (uint64_t*)dbuf(0);
  for (uint64_t i = 0; i < 512 / 8; i++) w[i] = canary;
  batch_base = avail;
  set_desc(0, OP_READ, 0, 0xfe000000ull, 4096);          /* buffer in the MMIO hole */
  set_desc(1, OP_READ, sectors, (uint64_t)dbuf(0), 512); /* first sector past the end */
  set_desc(2, OP_WRITE, sectors - 1, (uint64_t)dbuf(0), 1024); /* runs past the end */
  set_desc(3, OP_READ, 0, (uint64_t)dbuf(0) + 8, 512);   /* buffer not 512-aligned */
  set_desc(4, OP_WRITE, 0, (uint64_t)dbuf(0), 100);      /* length not a sector multiple */
  set_desc(5, 7, 0, (uint64_t)dbuf(0), 512);             /* unknown op */
  set_desc(6, OP_READ, 0, 1ull << 52, 512);              /* beyond any RAM */
  const unsigned n = 7;
  run_batch(n);
  unsigned rejected = 0;
  for (unsigned i = 0; i < n; i++) {
    uint8_t want = i == 5 ? ST_UNSUPPORTED : ST_BAD;
    if (req(i)->status == want) rejected++;
  }
  for (uint64_t i = 0; i < 512 / 8; i++)
    if (w[i] != canary) rejected = 0; /* a refused read must not have written the buffer */
  if (rejected != n) ds.errors++;
  struct line l;
  line_init(&l);
  line_str(&l, "kvmig-guest: disk bad-requests rejected=");
  line_u64(&l, rejected);
  line_str(&l, " of=");
  line_u64(&l, n);
  line_emit(&l);
}

void disk_user_init(uint64_t seed) {
  ds.rng = seed ? seed : 1;
  if (cfg.drate_mibps) {
    /* dblock divides 1 MiB, so blocks/s is a whole number; ticks per block in 48.16 fixed point. */
    uint64_t blocks_per_s = cfg.drate_mibps * (MIB / cfg.dblock);
    ds.ticks_per_block_fp = ((cfg.tsc_khz * 1000) << 16) / blocks_per_s;
    ds.due_fp = rdtsc() << 16;
  }
  if (cfg.dbad) bad_requests();
}

/* One disk pass: dpass block writes in the pattern (unless `write` is false: idle=1 after
 * pass 1), then dverify blocks read back. */
void disk_pass(bool write) {
  ds.lines = 0;
  if (write) write_blocks(cfg.dpass);
  verify_blocks(cfg.dverify);
}

/* At the end: a flush, then every block with a known version read back. */
void disk_final(void) {
  ds.lines = 0;
  flush_disk();
  ds.vcursor = 0;
  verify_blocks(nblocks);
}

void disk_pass_line(uint64_t n) {
  struct line l;
  line_init(&l);
  line_str(&l, "kvmig-guest: disk pass n=");
  line_u64(&l, n);
  line_str(&l, " writes=");
  line_u64(&l, ds.writes);
  line_str(&l, " reads=");
  line_u64(&l, ds.reads);
  line_str(&l, " errors=");
  line_u64(&l, ds.errors);
  line_emit(&l);
}

uint64_t disk_errors(void) { return ds.errors; }
