#include "kvm/state_file.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>

namespace kvmig::kvm {
namespace {

bool valid_id(const std::string& id) {
  if (id.empty() || id.size() > kMaxSectionIdLength) return false;
  return std::all_of(id.begin(), id.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-';
  });
}

// O_DIRECT wants aligned buffers, offsets and lengths; 8 MiB blocks keep the disk busy
// without holding much memory.
constexpr size_t kDirectAlign = 4096;
constexpr size_t kDirectBufferSize = 8u << 20;

uint64_t file_header_checksum(const FileHeader& h) {
  return XXH3_64bits(&h, offsetof(FileHeader, checksum));
}

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
    w.buffer_.reset(static_cast<uint8_t*>(std::aligned_alloc(kDirectAlign, kDirectBufferSize)));
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
  h.checksum = file_header_checksum(h);
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
                                            std::span<const iovec> parts) {
  if (!fd_.valid() || finished_) return Error{"state file " + path_ + ": writer already closed"};
  if (!valid_id(id)) return Error{"state file: invalid section id '" + id + "'"};
  if (version == 0) return Error{"state file: section '" + id + "' has version 0"};

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
        size_t take = std::min(len, kDirectBufferSize - buffered_);
        std::memcpy(buffer_.get() + buffered_, p, take);
        buffered_ += take;
        p += take;
        len -= take;
        offset_ += take;
        if (buffered_ == kDirectBufferSize) KVMIG_TRY(flush_buffer(false));
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
// Reader

Result<StateFileReader> StateFileReader::open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error::from_errno("open state file " + path);
  // The file is read once, front to back, mostly in huge reads straight into guest memory;
  // without this the kernel reads ahead in 128 KiB steps and a restore from disk (the save
  // bypassed the page cache) runs several times slower than `dd`. Advice only: no error.
  (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  (void)::posix_fadvise(fd, 0, 0, POSIX_FADV_WILLNEED);
  return from_fd(Fd(fd), path);
}

Result<StateFileReader> StateFileReader::from_fd(Fd fd, std::string name) {
  StateFileReader r;
  r.fd_ = std::move(fd);
  r.name_ = std::move(name);
  r.hash_.reset(XXH3_createState());
  if (r.hash_ == nullptr) return Error{"state file " + r.name_ + ": out of memory"};

  FileHeader h{};
  ssize_t n = ::read(r.fd_.get(), &h, sizeof(h));
  if (n < 0) return Error::from_errno("read state file " + r.name_);
  if (n >= 8 && std::memcmp(h.magic, kStateFileMagic, sizeof(h.magic)) != 0)
    return r.error("not a kvmig state file (bad magic)");
  if (static_cast<size_t>(n) < sizeof(h))
    return r.error("truncated: file header is " + std::to_string(n) + " of " +
                   std::to_string(sizeof(h)) + " bytes");
  if (h.checksum != file_header_checksum(h)) return r.error("file header checksum mismatch");
  if (h.format_version != kStateFileFormatVersion)
    return r.error("unsupported format version " + std::to_string(h.format_version) +
                   " (this kvmig reads version " + std::to_string(kStateFileFormatVersion) + ")");
  if (h.header_size != sizeof(FileHeader) || h.reserved != 0)
    return r.error("malformed file header");
  r.offset_ = sizeof(h);
  return r;
}

Error StateFileReader::error(const std::string& what) const {
  return Error{"state file " + name_ + ": " + what};
}

Result<void> StateFileReader::read_exact(void* dst, uint64_t len, const char* what) {
  auto* p = static_cast<uint8_t*>(dst);
  uint64_t done = 0;
  while (done < len) {
    // read() moves at most ~2 GiB at a time; stay well under that.
    size_t chunk = static_cast<size_t>(std::min<uint64_t>(len - done, 1ull << 30));
    ssize_t n = ::read(fd_.get(), p + done, chunk);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error::from_errno("read state file " + name_ + " at offset " +
                               std::to_string(offset_ + done));
    }
    if (n == 0)
      return error(std::string("truncated: ") + what + " at offset " + std::to_string(offset_) +
                   " needs " + std::to_string(len) + " bytes, file ends after " +
                   std::to_string(done));
    done += n;
  }
  offset_ += len;
  return ok();
}

Result<SectionInfo> StateFileReader::next() {
  if (in_payload_)
    return error("section '" + current_.id + "' at offset " + std::to_string(current_.offset) +
                 " was not fully read");
  FrameHeader h{};
  uint64_t at = offset_;
  ssize_t n;
  do n = ::read(fd_.get(), &h, sizeof(h));
  while (n < 0 && errno == EINTR);
  if (n < 0) return Error::from_errno("read state file " + name_);
  if (n == 0)
    return error("truncated: ends at offset " + std::to_string(at) + " without an end section");
  if (static_cast<size_t>(n) < sizeof(h)) {
    // A short read of a regular file means EOF; finish the read to be sure.
    uint64_t got = n;
    offset_ += n;
    auto rest = read_exact(reinterpret_cast<uint8_t*>(&h) + got, sizeof(h) - got, "section header");
    if (!rest) return std::move(rest.error());
  } else {
    offset_ += n;
  }

  if (h.magic != kFrameMagic)
    return error("corrupt: no section header at offset " + std::to_string(at) + " (bad magic)");
  if (std::memchr(h.id, '\0', sizeof(h.id)) == nullptr)
    return error("corrupt: section id at offset " + std::to_string(at) + " is not terminated");
  SectionInfo info;
  info.id = std::string(h.id);
  info.version = h.version;
  info.length = h.length;
  info.offset = at;
  if (!valid_id(info.id))
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
    uint8_t extra;
    ssize_t more = ::read(fd_.get(), &extra, 1);
    if (more > 0) return error("corrupt: data after the end section at offset " +
                               std::to_string(offset_));
  }
  return info;
}

Result<void> StateFileReader::read_payload(uint8_t* dst, uint64_t len) {
  if (!in_payload_ || len > remaining_)
    return error("section '" + current_.id + "': read of " + std::to_string(len) +
                 " bytes past its payload");
  KVMIG_TRY(read_exact(dst, len, ("payload of section '" + current_.id + "'").c_str()));
  XXH3_64bits_update(hash_.get(), dst, len);
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
