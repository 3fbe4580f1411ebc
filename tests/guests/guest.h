/* The kvmig test guest: shared declarations of its freestanding C parts.
 *
 * Privilege split: kernel.c runs at CPL0 (boot, paging, SMP start; emulated and slow on
 * kvm-pvm, so it only does bounded setup work); workload.c runs at CPL3 with IOPL=3 (all hot
 * loops, native speed on kvm-pvm; `out` to the console/exit ports is allowed by IOPL). */
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MAX_VCPUS 32
#define PAGE_SIZE 4096ull
#define MIB (1ull << 20)
#define GIB (1ull << 30)

/* Virtual layout. 0..4 GiB is identity-mapped (image, multiboot info, LAPIC). The shadow table
 * and the working set get their own virtual ranges so that they are contiguous even when the
 * RAM behind them is not (e.g. kvmig puts RAM above 3 GiB at 4 GiB). */
#define SHADOW_VA 0x8000000000ull  /* PML4 slot 1 */
#define WS_VA 0x10000000000ull     /* PML4 slot 2 */
#define RAM_FLOOR (32 * MIB)       /* RAM below this is left to the image and the loader */
#define TRAMPOLINE_PA 0x8000ull    /* AP real-mode entry (SIPI vector 0x08) */
#define LAPIC_PA 0xFEE00000ull
#define LAPIC_VA 0x18000000000ull  /* PML4 slot 3: its own uncached 2 MiB page */

#define EXIT_PASS 0
#define EXIT_FAIL 1
#define EXIT_BOOT_ERROR 2 /* bad command line, not enough RAM, APs did not start */
#define EXIT_FAULT 3      /* CPU exception */

/* Each working-set page starts and ends with {tag, version}; the tag names the page. */
#define PAGE_TAG(p) (0x6b76000000000000ull | (uint64_t)(p))

enum pattern { PATTERN_SEQ, PATTERN_RANDOM, PATTERN_HOTCOLD };

struct config {
  uint64_t ws_bytes;
  uint64_t ws_pages;
  enum pattern pattern;
  uint32_t hot_pct;
  uint32_t hotp_pct;
  uint64_t rate_mibps; /* 0 = as fast as possible */
  uint32_t vcpus;
  uint64_t passes; /* 0 = forever */
  uint64_t report_ms;
  uint64_t tsc_khz; /* 0 = not given: kernel.c calibrates with the PIT */
  bool idle;
  /* disk workload (disk.c), on vCPU 0 */
  bool disk;
  enum pattern dpattern;
  uint32_t dhot_pct;
  uint64_t drate_mibps; /* 0 = as fast as possible */
  uint64_t dblock;      /* bytes, power of two 4K..256K */
  uint64_t dqd;         /* requests per batch = ring entries, 8..64, dqd * dblock <= 8 MiB */
  uint64_t dpass;       /* block writes per disk pass */
  uint64_t dverify;     /* blocks read back per disk pass */
  bool dbad;            /* issue invalid requests first and check they are refused */
};

extern struct config cfg;

/* config.c: NULL on success, else a static one-line reason. */
const char* parse_cmdline(const char* cmdline, struct config* out);
const char* pattern_name(enum pattern p);

/* console.c: one report line is built in a buffer, then written under a lock so lines from
 * different vCPUs never interleave. */
struct line {
  char buf[192];
  unsigned len;
};
void line_init(struct line* l);
void line_str(struct line* l, const char* s);
void line_u64(struct line* l, uint64_t v);
void line_hex(struct line* l, uint64_t v);
void line_emit(struct line* l); /* appends '\n' */
void print_error(const char* a, const char* b);
void console_break_lock(void);
extern volatile bool console_use_trap;
__attribute__((noreturn)) void guest_exit(uint32_t status);

static inline uint64_t rdtsc(void) {
  uint32_t lo, hi;
  __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
  return ((uint64_t)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void outb(uint16_t port, uint8_t v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); }
/* One `rep outsb`: a VMM sees one exit for the whole string (count in KVM's kvm_run.io), which
 * matters at CPL0 on kvm-pvm, where each exit to the VMM costs ~28 us. */
static inline void outsb(uint16_t port, const void* p, uint64_t n) {
  __asm__ volatile("rep outsb" : "+S"(p), "+c"(n) : "d"(port) : "memory");
}
static inline uint8_t inb(uint16_t port) {
  uint8_t v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
  return v;
}

/* workload.c: the CPL3 body of every vCPU; never returns. */
__attribute__((noreturn)) void user_main(uint64_t cpu);

/* disk.c: disk_init at CPL0 (NULL or a boot error), the rest at CPL3 on vCPU 0. */
const char* disk_init(void);
void disk_user_init(uint64_t seed);
void disk_pass(bool write);
void disk_final(void);
void disk_pass_line(uint64_t n);
uint64_t disk_errors(void);

/* boot.S */
__attribute__((noreturn)) void enter_user(void (*rip)(uint64_t), uint64_t rsp, uint64_t arg);

void* memcpy(void* dst, const void* src, size_t n);
void* memset(void* dst, int c, size_t n);
