/* Debug console (port 0xe9, one byte per `out`) and exit port (0xf4). Every byte is a VM exit
 * (~28 us on kvm-pvm), so callers keep lines short and rate-limited. */
#include "guest.h"

static volatile uint32_t console_lock;
volatile bool console_use_trap; /* set by kernel.c when CPL3 `out` traps (kvm-pvm) */

void line_init(struct line* l) { l->len = 0; }

void line_str(struct line* l, const char* s) {
  while (*s && l->len < sizeof(l->buf) - 1) l->buf[l->len++] = *s++;
}

void line_u64(struct line* l, uint64_t v) {
  char tmp[24];
  int n = 0;
  do {
    tmp[n++] = (char)('0' + v % 10);
    v /= 10;
  } while (v);
  while (n && l->len < sizeof(l->buf) - 1) l->buf[l->len++] = tmp[--n];
}

void line_hex(struct line* l, uint64_t v) {
  line_str(l, "0x");
  char tmp[16];
  int n = 0;
  do {
    tmp[n++] = "0123456789abcdef"[v & 15];
    v >>= 4;
  } while (v);
  while (n && l->len < sizeof(l->buf) - 1) l->buf[l->len++] = tmp[--n];
}

void line_emit(struct line* l) {
  l->buf[l->len++] = '\n';
  while (__atomic_exchange_n(&console_lock, 1, __ATOMIC_ACQUIRE)) cpu_relax();
  uint16_t cs;
  __asm__ volatile("mov %%cs, %0" : "=r"(cs));
  if (console_use_trap && (cs & 3))
    __asm__ volatile("syscall" ::"D"(l->buf), "S"((uint64_t)l->len)
                     : "rax", "rcx", "rdx", "r8", "r9", "r10", "r11", "memory");
  else if ((cs & 3) == 0)
    outsb(0xe9, l->buf, l->len);
  else /* CPL3 on real KVM and TCG: plain `out`s, the form kernel.c emulates on kvm-pvm */
    for (unsigned i = 0; i < l->len; i++) outb(0xe9, (uint8_t)l->buf[i]);
  __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE);
  l->len = 0;
}

/* For the fault handler: the faulting code may hold the lock, and the VM ends right after. */
void console_break_lock(void) { __atomic_store_n(&console_lock, 0, __ATOMIC_RELEASE); }

void print_error(const char* a, const char* b) {
  struct line l;
  line_init(&l);
  line_str(&l, "kvmig-guest: error ");
  line_str(&l, a);
  if (b) line_str(&l, b);
  line_emit(&l);
}

void guest_exit(uint32_t status) {
  outl(0xf4, status);
  /* Only reached when no exit device is present: stop doing work. At CPL0 hlt with IF=0
   * parks the vCPU for good; CPL3 may not hlt, so it spins. */
  uint16_t cs;
  __asm__ volatile("mov %%cs, %0" : "=r"(cs));
  for (;;) {
    if ((cs & 3) == 0) __asm__ volatile("cli; hlt");
    cpu_relax();
  }
}

void* memcpy(void* dst, const void* src, size_t n) {
  uint8_t* d = dst;
  const uint8_t* s = src;
  while (n--) *d++ = *s++;
  return dst;
}

void* memset(void* dst, int c, size_t n) {
  uint8_t* d = dst;
  while (n--) *d++ = (uint8_t)c;
  return dst;
}
