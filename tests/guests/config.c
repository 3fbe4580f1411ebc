/* Parsing of the guest command line (the Multiboot cmdline): space-separated key=value.
 * Runs once at CPL0 on a string of a few hundred bytes, so simplicity beats speed. */
#include "guest.h"

static bool str_eq(const char* a, unsigned alen, const char* b) {
  unsigned i = 0;
  for (; i < alen; i++)
    if (b[i] != a[i]) return false;
  return b[i] == 0;
}

/* Decimal number with an optional K/M/G/T suffix (binary units) when `sizes` is set. */
static bool parse_num(const char* s, unsigned n, bool sizes, uint64_t* out) {
  if (n == 0) return false;
  uint64_t shift = 0;
  if (sizes) {
    switch (s[n - 1]) {
      case 'k': case 'K': shift = 10; n--; break;
      case 'm': case 'M': shift = 20; n--; break;
      case 'g': case 'G': shift = 30; n--; break;
      case 't': case 'T': shift = 40; n--; break;
      default: break;
    }
    if (n == 0) return false;
  }
  uint64_t v = 0;
  for (unsigned i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return false;
    uint64_t d = (uint64_t)(s[i] - '0');
    if (v > (UINT64_MAX - d) / 10) return false;
    v = v * 10 + d;
  }
  if (shift && v > (UINT64_MAX >> shift)) return false;
  *out = v << shift;
  return true;
}

const char* pattern_name(enum pattern p) {
  switch (p) {
    case PATTERN_SEQ: return "seq";
    case PATTERN_RANDOM: return "random";
    case PATTERN_HOTCOLD: return "hotcold";
  }
  return "?";
}

static const char* apply(struct config* c, const char* k, unsigned kn, const char* v, unsigned vn) {
  uint64_t x = 0;
  if (str_eq(k, kn, "ws")) {
    if (!parse_num(v, vn, true, &x) || x < PAGE_SIZE || x > 256 * GIB) return "bad ws= (4K..256G)";
    c->ws_bytes = x;
  } else if (str_eq(k, kn, "pattern")) {
    if (str_eq(v, vn, "seq")) c->pattern = PATTERN_SEQ;
    else if (str_eq(v, vn, "random")) c->pattern = PATTERN_RANDOM;
    else if (str_eq(v, vn, "hotcold")) c->pattern = PATTERN_HOTCOLD;
    else return "bad pattern= (seq|random|hotcold)";
  } else if (str_eq(k, kn, "hot")) {
    if (!parse_num(v, vn, false, &x) || x < 1 || x > 100) return "bad hot= (1..100)";
    c->hot_pct = (uint32_t)x;
  } else if (str_eq(k, kn, "hotp")) {
    if (!parse_num(v, vn, false, &x) || x > 100) return "bad hotp= (0..100)";
    c->hotp_pct = (uint32_t)x;
  } else if (str_eq(k, kn, "rate")) {
    if (str_eq(v, vn, "max")) c->rate_mibps = 0;
    else if (!parse_num(v, vn, false, &x) || x < 1 || x > (1ull << 30)) return "bad rate= (max|MIBPS)";
    else c->rate_mibps = x;
  } else if (str_eq(k, kn, "vcpus")) {
    if (!parse_num(v, vn, false, &x) || x < 1 || x > MAX_VCPUS) return "bad vcpus= (1..32)";
    c->vcpus = (uint32_t)x;
  } else if (str_eq(k, kn, "passes")) {
    if (!parse_num(v, vn, false, &x)) return "bad passes=";
    c->passes = x;
  } else if (str_eq(k, kn, "report_ms")) {
    if (!parse_num(v, vn, false, &x) || x > 3600000) return "bad report_ms= (0..3600000)";
    c->report_ms = x;
  } else if (str_eq(k, kn, "tsc_khz")) {
    if (!parse_num(v, vn, false, &x) || x < 1000 || x > 100000000) return "bad tsc_khz=";
    c->tsc_khz = x;
  } else if (str_eq(k, kn, "idle")) {
    if (!parse_num(v, vn, false, &x) || x > 1) return "bad idle= (0|1)";
    c->idle = x == 1;
  } else if (str_eq(k, kn, "disk")) {
    if (!parse_num(v, vn, false, &x) || x > 1) return "bad disk= (0|1)";
    c->disk = x == 1;
  } else if (str_eq(k, kn, "dpattern")) {
    if (str_eq(v, vn, "seq")) c->dpattern = PATTERN_SEQ;
    else if (str_eq(v, vn, "random")) c->dpattern = PATTERN_RANDOM;
    else if (str_eq(v, vn, "hotcold")) c->dpattern = PATTERN_HOTCOLD;
    else return "bad dpattern= (seq|random|hotcold)";
  } else if (str_eq(k, kn, "dhot")) {
    if (!parse_num(v, vn, false, &x) || x < 1 || x > 100) return "bad dhot= (1..100)";
    c->dhot_pct = (uint32_t)x;
  } else if (str_eq(k, kn, "drate")) {
    if (str_eq(v, vn, "max")) c->drate_mibps = 0;
    else if (!parse_num(v, vn, false, &x) || x < 1 || x > (1ull << 20)) return "bad drate= (max|MIBPS)";
    else c->drate_mibps = x;
  } else if (str_eq(k, kn, "dblock")) {
    if (!parse_num(v, vn, true, &x) || x < 4096 || x > 256 * 1024 || (x & (x - 1)))
      return "bad dblock= (power of two 4K..256K)";
    c->dblock = x;
  } else if (str_eq(k, kn, "dqd")) {
    if (!parse_num(v, vn, false, &x) || x < 8 || x > 64 || (x & (x - 1))) return "bad dqd= (8, 16, 32 or 64)";
    c->dqd = x;
  } else if (str_eq(k, kn, "dpass")) {
    if (!parse_num(v, vn, false, &x) || x < 1 || x > (1ull << 30)) return "bad dpass= (1..)";
    c->dpass = x;
  } else if (str_eq(k, kn, "dverify")) {
    if (!parse_num(v, vn, false, &x) || x > (1ull << 30)) return "bad dverify= (0..)";
    c->dverify = x;
  } else if (str_eq(k, kn, "dbad")) {
    if (!parse_num(v, vn, false, &x) || x > 1) return "bad dbad= (0|1)";
    c->dbad = x == 1;
  } else {
    return "unknown option (ws pattern hot hotp rate vcpus passes report_ms tsc_khz idle disk dpattern dhot "
           "drate dblock dqd dpass dverify dbad)";
  }
  return 0;
}

const char* parse_cmdline(const char* s, struct config* c) {
  c->ws_bytes = 64 * MIB;
  c->pattern = PATTERN_SEQ;
  c->hot_pct = 25;
  c->hotp_pct = 90;
  c->rate_mibps = 0;
  c->vcpus = 1;
  c->passes = 0;
  c->report_ms = 200;
  c->tsc_khz = 0;
  c->idle = false;
  c->disk = false;
  c->dpattern = PATTERN_SEQ;
  c->dhot_pct = 10;
  c->drate_mibps = 0;
  c->dblock = 64 * 1024;
  c->dqd = 8;
  c->dpass = 64;
  c->dverify = 64;
  c->dbad = false;
  bool first = true;
  while (*s) {
    while (*s == ' ' || *s == '\t') s++;
    if (!*s) break;
    const char* tok = s;
    while (*s && *s != ' ' && *s != '\t') s++;
    unsigned n = (unsigned)(s - tok), eq = 0;
    while (eq < n && tok[eq] != '=') eq++;
    if (eq == n) {
      /* QEMU puts the kernel's file name first; any other bare word is a mistake. */
      if (first) { first = false; continue; }
      return "option without '=' in command line";
    }
    first = false;
    const char* err = apply(c, tok, eq, tok + eq + 1, n - eq - 1);
    if (err) return err;
  }
  c->ws_pages = c->ws_bytes / PAGE_SIZE;
  if (c->ws_pages < c->vcpus) return "ws= smaller than one page per vCPU";
  if (c->dqd * c->dblock > 8 * MIB) return "dqd= times dblock= exceeds the 8 MiB disk buffer pool";
  return 0;
}
