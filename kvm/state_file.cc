#include "kvm/state_file.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace kvmig::kvm {

bool detail::valid_section_id(const std::string& id) {
  if (id.empty() || id.size() > kMaxSectionIdLength) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
  });
}

uint64_t detail::file_header_checksum(const FileHeader& h) {
  return XXH3_64bits(&h, offsetof(FileHeader, checksum));
}

namespace {
constexpr size_t kDirectAlign = kFileAlign;
}  // namespace

// ---------------------------------------------------------------------------------------
// Writer

Result<StateFileWriter> StateFileWriter::create(const std::string& path, bool sync) {
  StateFileWriter w;
  w.path_ = path;
  w.partial_path_ = path + ".partial";
  w.sync_ = sync;
  int flags = O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC;
  int fd = ::open(w.partial_path_.c_str(), flags | O_DIRECT, 0600);
  if (fd >= 0) {
    w.buffer_.reset(static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, kStateFileBufferSize)));
    if (w.buffer_ == nullptr) {
      ::close(fd);
      return Error{"state file " + w.partial_path_ + ": out of memory for the write buffer"};
    }
  } else if (errno == EINVAL) {  // the file system has no O_DIRECT (tmpfs)
    fd = ::open(w.partial_path_.c_str(), flags, 0600);
  }
  if (fd < 0) return Error::from_errno("create state file " + w.partial_path_);
  w.fd_.reset(fd);

  FileHeader h{};
  std::memcpy(h.magic, kStateFileMagic, sizeof(h.magic));
  h.format_version = kStateFileFormatVersion;
  h.header_size = sizeof(FileHeader);
  h.checksum = detail::file_header_checksum(h);
  iovec iov{&h, sizeof(h)};
  KVMIG_TRY(w.write_all({&iov, 1}));
  return w;
}

StateFileWriter::~StateFileWriter() {
  if (fd_.valid() && !finished_) ::unlink(partial_path_.c_str());
}

Result<void> StateFileWriter::write_section(const StateSection& section) {
  iovec part{const_cast<uint8_t*>(section.data.data()), section.data.size()};
  return write_section(section.id, section.version,
                       section.data.empty() ? std::span<const iovec>{} : std::span{&part, 1});
}

Result<void> StateFileWriter::write_section(const std::string& id, uint32_t version,
                                            std::span<const iovec> parts, uint64_t align_at) {
  if (!fd_.valid() || finished_) return Error{"state file " + path_ + ": writer already closed"};
  if (!detail::valid_section_id(id)) return Error{"state file: invalid section id '" + id + "'"};
  if (version == 0) return Error{"state file: section '" + id + "' has version 0"};
  if (align_at != kUnaligned) {
    // A pad section is a frame header plus 0..4095 zero bytes, so the gap it fills is
    // 64..4159 bytes: one of those moves byte ALIGN_AT onto the next boundary.
    uint64_t gap = (kFileAlign - (offset_ + sizeof(FrameHeader) + align_at) % kFileAlign) %
                   kFileAlign;
    if (gap != 0 && gap < sizeof(FrameHeader)) gap += kFileAlign;
    if (gap != 0) {
      static const uint8_t zeros[kFileAlign] = {};
      iovec pad{const_cast<uint8_t*>(zeros), gap - sizeof(FrameHeader)};
      KVMIG_TRY(write_section(kPadSectionId, 1,
                              pad.iov_len == 0 ? std::span<const iovec>{} : std::span{&pad, 1}));
    }
  }

  FrameHeader h{};
  h.magic = kFrameMagic;
  h.version = version;
  std::memcpy(h.id, id.data(), id.size());
  for (const iovec& p : parts) h.length += p.iov_len;

  // Hashing is ~10x faster than the write itself, so one pass before writing costs little
  // and lets the header, checksum included, go out first in the same writev.
  XXH3_state_t* st = XXH3_createState();
  if (st == nullptr) return Error{"state file: out of memory for checksum state"};
  XXH3_64bits_reset(st);
  XXH3_64bits_update(st, &h, sizeof(h));
  for (const iovec& p : parts) XXH3_64bits_update(st, p.iov_base, p.iov_len);
  h.checksum = XXH3_64bits_digest(st);
  XXH3_freeState(st);

  std::vector<iovec> iov;
  iov.reserve(parts.size() + 1);
  iov.push_back({&h, sizeof(h)});
  iov.insert(iov.end(), parts.begin(), parts.end());
  auto r = write_all(iov);
  if (!r) return std::move(r.error().prefix("section '" + id + "'"));
  return ok();
}

Result<void> StateFileWriter::write_fd(const uint8_t* p, size_t len) {
  while (len > 0) {
    ssize_t n = ::write(fd_.get(), p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EINVAL && direct()) {
      // Some file systems accept O_DIRECT at open and refuse it on write: go on buffered.
      int fl = ::fcntl(fd_.get(), F_GETFL);
      if (fl >= 0 && (fl & O_DIRECT) && ::fcntl(fd_.get(), F_SETFL, fl & ~O_DIRECT) == 0) continue;
    }
    if (n < 0)
      return Error::from_errno("write state file " + partial_path_ + " at offset " +
                               std::to_string(flushed_));
    p += n;
    len -= static_cast<size_t>(n);
    flushed_ += static_cast<uint64_t>(n);
  }
  return ok();
}

// Writes the whole blocks of the bounce buffer; FINAL also writes the unaligned tail, with
// O_DIRECT turned off for it (the file must end exactly where its data does).
Result<void> StateFileWriter::flush_buffer(bool final) {
  size_t whole = buffered_ & ~(kDirectAlign - 1);
  KVMIG_TRY(write_fd(buffer_.get(), whole));
  size_t tail = buffered_ - whole;
  if (tail > 0 && final) {
    int fl = ::fcntl(fd_.get(), F_GETFL);
    if (fl < 0 || ::fcntl(fd_.get(), F_SETFL, fl & ~O_DIRECT) != 0)
      return Error::from_errno("fcntl(F_SETFL) on state file " + partial_path_);
    KVMIG_TRY(write_fd(buffer_.get() + whole, tail));
    tail = 0;
  }
  if (tail > 0) std::memmove(buffer_.get(), buffer_.get() + whole, tail);
  buffered_ = tail;
  return ok();
}

Result<void> StateFileWriter::write_all(std::span<const iovec> parts) {
  if (direct()) {
    // One copy into the aligned buffer: cheaper here than the page cache's own copy plus
    // its allocation and writeback throttling for a fresh multi-GiB file.
    for (const iovec& part : parts) {
      const auto* p = static_cast<const uint8_t*>(part.iov_base);
      size_t len = part.iov_len;
      while (len > 0) {
        size_t take = std::min(len, kStateFileBufferSize - buffered_);
        std::memcpy(buffer_.get() + buffered_, p, take);
        buffered_ += take;
        p += take;
        len -= take;
        offset_ += take;
        if (buffered_ == kStateFileBufferSize) KVMIG_TRY(flush_buffer(false));
      }
    }
    return ok();
  }
  std::vector<iovec> iov(parts.begin(), parts.end());
  size_t first = 0;
  while (first < iov.size()) {
    if (iov[first].iov_len == 0) {
      ++first;
      continue;
    }
    int count = static_cast<int>(std::min<size_t>(iov.size() - first, IOV_MAX));
    ssize_t n = ::writev(fd_.get(), &iov[first], count);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error::from_errno("write state file " + partial_path_ + " at offset " +
                               std::to_string(offset_));
    }
    offset_ += n;
    // Advance past what the kernel took; a single writev moves at most ~2 GiB.
    size_t left = static_cast<size_t>(n);
    while (left > 0 && first < iov.size()) {
      size_t take = std::min(left, iov[first].iov_len);
      iov[first].iov_base = static_cast<uint8_t*>(iov[first].iov_base) + take;
      iov[first].iov_len -= take;
      left -= take;
      if (iov[first].iov_len == 0) ++first;
    }
  }
  return ok();
}

Result<void> StateFileWriter::finish() {
  KVMIG_TRY(write_section(kEndSectionId, 1, {}));
  if (direct()) KVMIG_TRY(flush_buffer(true));
  if (sync_ && ::fsync(fd_.get()) != 0) return Error::from_errno("fsync " + partial_path_);
  if (::rename(partial_path_.c_str(), path_.c_str()) != 0)
    return Error::from_errno("rename " + partial_path_ + " to " + path_);
  finished_ = true;
  fd_.reset();
  return ok();
}

// ---------------------------------------------------------------------------------------
// Payload parsing

Result<void> PayloadReader::get_bytes(void* dst, size_t n, const char* field) {
  KVMIG_ASSIGN(const uint8_t* p, view(n, field));
  std::memcpy(dst, p, n);
  return ok();
}

Result<const uint8_t*> PayloadReader::view(size_t n, const char* field) {
  if (n > remaining())
    return Error{"section '" + s_.id + "' v" + std::to_string(s_.version) + ": too short for " +
                 field + " (" + std::to_string(n) + " bytes needed, " +
                 std::to_string(remaining()) + " left)"};
  const uint8_t* p = s_.data.data() + pos_;
  pos_ += n;
  return p;
}

Result<void> PayloadReader::expect_end() const {
  if (remaining() != 0)
    return Error{"section '" + s_.id + "' v" + std::to_string(s_.version) + ": " +
                 std::to_string(remaining()) + " unexpected trailing bytes"};
  return ok();
}

}  // namespace kvmig::kvm
