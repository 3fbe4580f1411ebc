// The state file reader (kvm/state_file.h): checked sections, and guest pages read from disk
// at the disk's speed.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include "kvm/state_file.h"

namespace kvmig::kvm {
namespace {

using detail::file_header_checksum;
constexpr size_t kDirectAlign = kFileAlign;
constexpr size_t kDirectBufferSize = kStateFileBufferSize;
// Reading: headers and small sections come through the buffer, refilled with at least
// kSmallRead bytes (what is read ahead is used by the next sections, never re-read); reads
// of at least kBulkMin go straight to their destination in chunks of kChunk, kDepth of them
// in flight (the disk sees a queue; the checksum of one chunk is computed while the next
// ones are read).
constexpr size_t kSmallRead = 512u << 10;
constexpr uint64_t kBulkMin = 64u << 10;
constexpr size_t kChunk = 8u << 20;
constexpr unsigned kDepth = 4;

uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Whether the pages of FD are in the page cache, judged from a few spread probes that read
// one byte without waiting for the disk: then buffered reads beat going to the disk.
bool looks_cached(int fd) {
  struct stat st{};
  if (::fstat(fd, &st) != 0 || st.st_size <= 0) return true;
  for (int i = 1; i < 8; ++i) {
    uint8_t byte;
    iovec iov{&byte, 1};
    off_t at = static_cast<off_t>(static_cast<uint64_t>(st.st_size) * i / 8);
    if (::preadv2(fd, &iov, 1, at, RWF_NOWAIT) != 1) return false;
  }
  return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Reader

Result<StateFileReader> StateFileReader::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error::from_errno("open state file " + path);
  Fd owned(fd);
  // A saved file is usually not in the page cache (the save bypassed it): buffered reads of
  // it ran 4-7x slower than `dd` with O_DIRECT. Where the file system refuses O_DIRECT,
  // F_SETFL fails and reads stay buffered.
  bool direct = false;
  if (!looks_cached(fd)) {
    int fl = ::fcntl(fd, F_GETFL);
    direct = fl >= 0 && ::fcntl(fd, F_SETFL, fl | O_DIRECT) == 0;
  }
  if (!direct) (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);  // advice only
  return from_fd(std::move(owned), path);
}

Result<StateFileReader> StateFileReader::from_fd(Fd fd, std::string name) {
  StateFileReader r;
  r.fd_ = std::move(fd);
  r.name_ = std::move(name);
  r.hash_.reset(XXH3_createState());
  r.buf_.reset(static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, kDirectBufferSize)));
  if (r.hash_ == nullptr || r.buf_ == nullptr)
    return Error{"state file " + r.name_ + ": out of memory"};
  struct stat st{};
  r.seekable_ = ::fstat(r.fd_.get(), &st) == 0 && S_ISREG(st.st_mode);
  if (r.seekable_) {
    off_t at = ::lseek(r.fd_.get(), 0, SEEK_CUR);
    r.file_pos_ = at > 0 ? static_cast<uint64_t>(at) : 0;
  }
  int fl = ::fcntl(r.fd_.get(), F_GETFL);
  r.direct_ = fl >= 0 && (fl & O_DIRECT) != 0;
  if (r.direct_ && (!r.seekable_ || r.file_pos_ % kDirectAlign != 0)) r.drop_direct();

  FileHeader h{};
  KVMIG_ASSIGN(size_t got, r.fill(sizeof(h)));
  size_t n = std::min(got, sizeof(h));
  std::memcpy(&h, r.buf_.get(), n);
  r.buf_pos_ = n;
  if (n >= 8 && std::memcmp(h.magic, kStateFileMagic, sizeof(h.magic)) != 0)
    return r.error("not a kvmig state file (bad magic)");
  if (n < sizeof(h))
    return r.error("truncated: file header is " + std::to_string(n) + " of " +
                   std::to_string(sizeof(h)) + " bytes");
  if (h.checksum != file_header_checksum(h)) return r.error("file header checksum mismatch");
  if (h.format_version < kOldestStateFileFormatVersion ||
      h.format_version > kStateFileFormatVersion)
    return r.error("unsupported format version " + std::to_string(h.format_version) +
                   " (this kvmig reads versions " + std::to_string(kOldestStateFileFormatVersion) +
                   " to " + std::to_string(kStateFileFormatVersion) + ")");
  if (h.header_size != sizeof(FileHeader) || h.reserved != 0)
    return r.error("malformed file header");
  r.format_version_ = h.format_version;
  r.offset_ = sizeof(h);
  return r;
}

Error StateFileReader::error(const std::string& what) const {
  return Error{"state file " + name_ + ": " + what};
}

void StateFileReader::drop_direct() {
  int fl = ::fcntl(fd_.get(), F_GETFL);
  if (fl >= 0) (void)::fcntl(fd_.get(), F_SETFL, fl & ~O_DIRECT);
  direct_ = false;
}

// One read at AT (or at the fd's position if it is not a regular file). Returns 0 at EOF.
Result<size_t> StateFileReader::read_fd(uint8_t* dst, size_t len, uint64_t at) {
  for (;;) {
    ssize_t n = seekable_ ? ::pread(fd_.get(), dst, len, static_cast<off_t>(at))
                          : ::read(fd_.get(), dst, len);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    // O_DIRECT refused after all (some file systems, or the unaligned end of the file).
    if (errno == EINVAL && direct_) {
      drop_direct();
      continue;
    }
    return Error::from_errno("read state file " + name_ + " at offset " + std::to_string(at));
  }
}

// Refills the empty buffer with at least WANT bytes if the file has them (one read, so a
// pipe gives what it has). Returns the bytes now buffered, 0 at EOF.
Result<size_t> StateFileReader::fill(uint64_t want) {
  size_t len = static_cast<size_t>(std::clamp<uint64_t>(round_up(want, kDirectAlign), kSmallRead,
                                                        kDirectBufferSize));
  KVMIG_ASSIGN(size_t n, read_fd(buf_.get(), len, file_pos_));
  file_pos_ += n;
  buf_len_ = n;
  buf_pos_ = 0;
  return n;
}

Result<void> StateFileReader::read_into(uint8_t* dst, uint64_t len, const std::string& what,
                                        bool hash) {
  const uint64_t start = offset_;
  uint64_t done = 0;
  while (done < len) {
    uint8_t* p = dst + done;
    uint64_t left = len - done;
    if (buf_pos_ < buf_len_) {
      size_t take = static_cast<size_t>(std::min<uint64_t>(left, buf_len_ - buf_pos_));
      std::memcpy(p, buf_.get() + buf_pos_, take);
      if (hash) XXH3_64bits_update(hash_.get(), p, take);
      buf_pos_ += take;
      done += take;
      offset_ += take;
      continue;
    }
    // Guest pages saved at aligned file offsets go straight into guest memory.
    bool aligned = ((file_pos_ | reinterpret_cast<uintptr_t>(p)) % kDirectAlign) == 0;
    if (left >= kBulkMin && (!direct_ || aligned)) {
      uint64_t bulk = direct_ ? left / kDirectAlign * kDirectAlign : left;
      KVMIG_ASSIGN(uint64_t got, read_bulk(p, bulk, hash));
      done += got;
      offset_ += got;
      if (got == bulk) continue;
    } else {
      KVMIG_ASSIGN(size_t got, fill(left));
      if (got > 0) continue;
    }
    return error("truncated: " + what + " at offset " + std::to_string(start) + " needs " +
                 std::to_string(len) + " bytes, file ends after " + std::to_string(done));
  }
  return ok();
}

// Reads LEN bytes at file_pos_ straight into DST; fewer only at EOF.
Result<uint64_t> StateFileReader::read_bulk(uint8_t* dst, uint64_t len, bool hash) {
  uint64_t done = 0;
  if (seekable_ && !ring_failed_) {
    if (ring_ == nullptr) {
      auto* ring = new io_uring;
      if (io_uring_queue_init(2 * kDepth, ring, 0) == 0) {
        ring_.reset(ring);
      } else {
        delete ring;  // no io_uring here (old kernel, seccomp): plain reads below
        ring_failed_ = true;
      }
    }
    if (ring_ != nullptr) {
      KVMIG_ASSIGN(done, read_bulk_uring(dst, len, hash));
    }
  }
  // Without io_uring, or what it left (O_DIRECT refused midway, EOF): one chunk at a time.
  while (done < len) {
    size_t want = static_cast<size_t>(std::min<uint64_t>(len - done, kChunk));
    KVMIG_ASSIGN(size_t n, read_fd(dst + done, want, file_pos_));
    if (n == 0) break;
    if (hash) XXH3_64bits_update(hash_.get(), dst + done, n);
    done += n;
    file_pos_ += n;
  }
  return done;
}

// The chunks of [DST, DST + LEN) are read kDepth at a time and hashed in order as they
// complete. Returns the bytes of whole chunks read and hashed, from the start; stops early
// at EOF or if O_DIRECT is refused (EINVAL), leaving the rest to the caller. Every read it
// started has completed when it returns: nothing writes into DST afterwards.
Result<uint64_t> StateFileReader::read_bulk_uring(uint8_t* dst, uint64_t len, bool hash) {
  const uint64_t base = file_pos_;
  const uint64_t chunks = (len + kChunk - 1) / kChunk;
  auto chunk_len = [&](uint64_t i) { return std::min<uint64_t>(kChunk, len - i * kChunk); };
  uint64_t got[kDepth] = {};  // bytes read of chunk i, at got[i % kDepth]
  uint64_t next_submit = 0, next_hash = 0;
  unsigned inflight = 0;
  bool stop = false;
  int err = 0;
  auto submit = [&](uint64_t i) {
    io_uring_sqe* sqe = io_uring_get_sqe(ring_.get());  // never null: 2*kDepth entries
    uint64_t off = i * kChunk + got[i % kDepth];
    io_uring_prep_read(sqe, fd_.get(), dst + off, static_cast<unsigned>(chunk_len(i) - got[i % kDepth]),
                       base + off);
    io_uring_sqe_set_data64(sqe, i);
    ++inflight;
  };
  while (next_hash < chunks) {
    while (!stop && next_submit < chunks && next_submit < next_hash + kDepth) {
      got[next_submit % kDepth] = 0;
      submit(next_submit++);
    }
    if (next_hash < next_submit && got[next_hash % kDepth] == chunk_len(next_hash)) {
      if (hash) XXH3_64bits_update(hash_.get(), dst + next_hash * kChunk, chunk_len(next_hash));
      ++next_hash;
      continue;
    }
    if (inflight == 0) break;  // stopped, and every read is back
    int rc = io_uring_submit_and_wait(ring_.get(), 1);
    if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY) {
      // Cannot reap what is in flight: do not return while the kernel may still write.
      ring_.reset();
      ring_failed_ = true;
      return Error::from_errno("io_uring_submit reading state file " + name_, -rc);
    }
    io_uring_cqe* cqe;
    while (io_uring_peek_cqe(ring_.get(), &cqe) == 0) {
      uint64_t i = io_uring_cqe_get_data64(cqe);
      int res = cqe->res;
      io_uring_cqe_seen(ring_.get(), cqe);
      --inflight;
      if (res == -EINTR || res == -EAGAIN) {
        if (!stop) submit(i);
      } else if (res < 0) {
        stop = true;
        if (err == 0) err = -res;
      } else if (res == 0) {
        stop = true;  // EOF: the file shrank since next() checked its size
      } else {
        got[i % kDepth] += static_cast<uint64_t>(res);
        if (got[i % kDepth] < chunk_len(i) && !stop) submit(i);
      }
    }
  }
  uint64_t done = std::min(len, next_hash * kChunk);
  file_pos_ = base + done;
  if (err == EINVAL && direct_) {
    drop_direct();
  } else if (err != 0) {
    return Error::from_errno("read state file " + name_ + " at offset " + std::to_string(file_pos_),
                             err);
  }
  return done;
}

Result<SectionInfo> StateFileReader::next() {
  if (in_payload_)
    return error("section '" + current_.id + "' at offset " + std::to_string(current_.offset) +
                 " was not fully read");
  for (;;) {
    KVMIG_ASSIGN(SectionInfo info, next_frame());
    if (info.id != kPadSectionId || format_version_ < 2) return info;
    KVMIG_TRY(skip_pad());
  }
}

Result<void> StateFileReader::skip_pad() {
  const std::string where = "pad section at offset " + std::to_string(current_.offset);
  if (current_.version != 1 || current_.length >= kFileAlign)
    return error("corrupt: " + where + " is malformed");
  uint8_t pad[kFileAlign];
  KVMIG_TRY(read_payload(pad, current_.length));
  KVMIG_TRY(finish_payload());
  for (uint64_t i = 0; i < current_.length; ++i)
    if (pad[i] != 0) return error("corrupt: " + where + " is not zero");
  return ok();
}

Result<SectionInfo> StateFileReader::next_frame() {
  FrameHeader h{};
  uint64_t at = offset_;
  if (buf_pos_ == buf_len_) {
    KVMIG_ASSIGN(size_t n, fill(sizeof(h)));
    if (n == 0)
      return error("truncated: ends at offset " + std::to_string(at) + " without an end section");
  }
  KVMIG_TRY(read_into(reinterpret_cast<uint8_t*>(&h), sizeof(h), "section header", false));

  if (h.magic != kFrameMagic)
    return error("corrupt: no section header at offset " + std::to_string(at) + " (bad magic)");
  if (std::memchr(h.id, '\0', sizeof(h.id)) == nullptr)
    return error("corrupt: section id at offset " + std::to_string(at) + " is not terminated");
  SectionInfo info;
  info.id = std::string(h.id);
  info.version = h.version;
  info.length = h.length;
  info.offset = at;
  if (!detail::valid_section_id(info.id))
    return error("corrupt: invalid section id at offset " + std::to_string(at));
  if (h.version == 0 || h.reserved != 0)
    return error("corrupt: section '" + info.id + "' at offset " + std::to_string(at) +
                 " has a malformed header");

  // For a regular file, a length beyond its end is known to be truncation before reading.
  struct stat stbuf{};
  if (::fstat(fd_.get(), &stbuf) == 0 && S_ISREG(stbuf.st_mode)) {
    uint64_t left = static_cast<uint64_t>(stbuf.st_size) - offset_;
    if (h.length > left)
      return error("truncated: section '" + info.id + "' at offset " + std::to_string(at) +
                   " declares " + std::to_string(h.length) + " bytes, only " +
                   std::to_string(left) + " remain");
  }

  expected_checksum_ = h.checksum;
  h.checksum = 0;
  XXH3_64bits_reset(hash_.get());
  XXH3_64bits_update(hash_.get(), &h, sizeof(h));
  current_ = info;
  remaining_ = info.length;
  in_payload_ = true;

  if (info.id == kEndSectionId) {
    if (info.length != 0) return error("corrupt: end section has a payload");
    KVMIG_TRY(finish_payload());
    size_t more = buf_len_ - buf_pos_;
    if (more == 0) {
      KVMIG_ASSIGN(more, fill(1));
    }
    if (more > 0)
      return error("corrupt: data after the end section at offset " + std::to_string(offset_));
  }
  return info;
}

Result<void> StateFileReader::read_payload(uint8_t* dst, uint64_t len) {
  if (!in_payload_ || len > remaining_)
    return error("section '" + current_.id + "': read of " + std::to_string(len) +
                 " bytes past its payload");
  KVMIG_TRY(read_into(dst, len, "payload of section '" + current_.id + "'", true));
  remaining_ -= len;
  return ok();
}

Result<void> StateFileReader::finish_payload() {
  if (!in_payload_ || remaining_ != 0)
    return error("section '" + current_.id + "': payload not fully read");
  in_payload_ = false;
  if (XXH3_64bits_digest(hash_.get()) != expected_checksum_)
    return error("checksum mismatch in section '" + current_.id + "' at offset " +
                 std::to_string(current_.offset));
  return ok();
}

Result<StateSection> StateFileReader::read_section(uint64_t cap) {
  if (!in_payload_) return error("read_section without a current section");
  if (current_.length > cap)
    return error("section '" + current_.id + "' at offset " + std::to_string(current_.offset) +
                 " is " + std::to_string(current_.length) + " bytes, more than the " +
                 std::to_string(cap) + " allowed");
  StateSection s;
  s.id = current_.id;
  s.version = current_.version;
  s.data.resize(current_.length);
  KVMIG_TRY(read_payload(s.data.data(), s.data.size()));
  KVMIG_TRY(finish_payload());
  return s;
}

}  // namespace kvmig::kvm
