// The state file: one saved machine, as a header and a sequence of checksummed sections.
//
// Layout (all integers little-endian; x86-64 only, so structs are written as they are):
//
//   FileHeader    32 bytes  magic "KVMIGST\n", format version, header size, XXH3 of the rest
//   Section*      each:
//     FrameHeader 64 bytes  frame magic, id (NUL-padded), section version, payload length,
//                           XXH3_64 of (this header with checksum zeroed) + payload
//     payload     `length` bytes, meaning defined by the section's owner and its version
//   "end" section zero-length; a file without it is truncated
//
// Format version 2 adds "pad" sections (version 1, payload: fewer than 4096 zero bytes), which
// the writer puts before a section whose bulk must start on a 4 KiB boundary of the file
// (guest pages). The reader skips them, checked like any section; version 1 files have none
// and are still read. Aligned pages let a restore read straight into page-aligned guest
// memory with O_DIRECT, at the disk's speed (docs/benchmarks.md "Save and restore").
//
// The checksum covers the frame header too, so a flipped id or length is caught as well as
// a flipped payload byte. Each section carries its own version (DESIGN.md "State format");
// the format version only changes if this framing changes.
//
// The reader trusts nothing: it caps every length, checks every field, and reports each
// problem as one line naming the file, the section and the byte offset.
#pragma once

#include <liburing.h>
#include <sys/uio.h>

#include <cstdint>
#include <cstdlib>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include <xxhash.h>

#include "base/fd.h"
#include "base/result.h"
#include "kvm/migratable.h"

namespace kvmig::kvm {

inline constexpr char kStateFileMagic[8] = {'K', 'V', 'M', 'I', 'G', 'S', 'T', '\n'};
inline constexpr uint32_t kStateFileFormatVersion = 2;
inline constexpr uint32_t kOldestStateFileFormatVersion = 1;  // still read
inline constexpr uint32_t kFrameMagic = 0x54434553;  // "SECT"
inline constexpr size_t kMaxSectionIdLength = 31;     // + NUL in a 32-byte field
inline constexpr char kEndSectionId[] = "end";
inline constexpr char kPadSectionId[] = "pad";
inline constexpr uint64_t kFileAlign = 4096;  // O_DIRECT granule; guest pages are aligned to it
inline constexpr uint64_t kUnaligned = ~0ull;
// O_DIRECT wants aligned buffers, offsets and lengths; 8 MiB blocks keep the disk busy
// without holding much memory.
inline constexpr size_t kStateFileBufferSize = 8u << 20;

struct FileHeader {
  char magic[8];
  uint32_t format_version;
  uint32_t header_size;
  uint64_t reserved;  // zero
  uint64_t checksum;  // XXH3_64 of the 24 bytes before it
};
static_assert(sizeof(FileHeader) == 32);

struct FrameHeader {
  uint32_t magic;  // kFrameMagic: catches a reader that lost its place
  uint32_t version;
  char id[32];
  uint64_t length;
  uint64_t checksum;
  uint64_t reserved;  // zero
};
static_assert(sizeof(FrameHeader) == 64);

namespace detail {
bool valid_section_id(const std::string& id);
uint64_t file_header_checksum(const FileHeader& h);
struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};
struct RingDeleter {
  void operator()(io_uring* ring) const {
    io_uring_queue_exit(ring);
    delete ring;
  }
};
}  // namespace detail


// A section header as read and checked; the payload has not been read yet.
struct SectionInfo {
  std::string id;
  uint32_t version = 0;
  uint64_t length = 0;
  uint64_t offset = 0;  // of the frame header in the file, for error messages
};

class StateFileWriter {
 public:
  // Writes to PATH.partial and renames it to PATH in finish(), so a failed or interrupted
  // save never leaves a file that looks complete. Where the file system takes O_DIRECT, the
  // file is written through an aligned bounce buffer in large blocks, bypassing the page
  // cache (steadier and faster than buffered writes for GiBs of guest memory: see
  // docs/benchmarks.md); elsewhere (tmpfs) with ordinary writes.
  static Result<StateFileWriter> create(const std::string& path, bool sync = false);

  StateFileWriter(StateFileWriter&&) = default;
  StateFileWriter& operator=(StateFileWriter&&) = default;
  ~StateFileWriter();

  Result<void> write_section(const StateSection& section);
  // A section whose payload is the concatenation of PARTS. With ALIGN_AT, a pad section
  // goes first so that payload byte ALIGN_AT lands on a kFileAlign boundary of the file.
  Result<void> write_section(const std::string& id, uint32_t version,
                             std::span<const iovec> parts, uint64_t align_at = kUnaligned);
  // Writes the end section, optionally fsyncs, and gives the file its final name.
  Result<void> finish();

  uint64_t bytes_written() const { return offset_; }
  bool direct() const { return buffer_ != nullptr; }

 private:
  StateFileWriter() = default;
  Result<void> write_all(std::span<const iovec> parts);
  Result<void> write_fd(const uint8_t* p, size_t len);
  Result<void> flush_buffer(bool final);

  std::unique_ptr<uint8_t, detail::FreeDeleter> buffer_;  // O_DIRECT bounce buffer, or null
  size_t buffered_ = 0;                            // bytes in buffer_ not yet written
  uint64_t flushed_ = 0;                           // bytes already in the file

  Fd fd_;
  std::string path_;
  std::string partial_path_;
  uint64_t offset_ = 0;
  bool sync_ = false;
  bool finished_ = false;
};

class StateFileReader {
 public:
  // Largest payload read_section() will hold in memory; bigger sections must be streamed.
  static constexpr uint64_t kDefaultSectionCap = 64ull << 20;

  // Reads with O_DIRECT (large aligned reads, straight into guest memory where the file
  // lets it, several in flight on io_uring while the checksum of the previous ones is
  // computed) unless the file is already in the page cache or its file system refuses
  // O_DIRECT (tmpfs); then with ordinary reads.
  static Result<StateFileReader> open(const std::string& path);
  // NAME is used in error messages ("state file NAME: ..."). Reads with O_DIRECT if FD has it.
  static Result<StateFileReader> from_fd(Fd fd, std::string name);

  StateFileReader(StateFileReader&&) = default;
  StateFileReader& operator=(StateFileReader&&) = default;

  // Reads and checks the next frame header. The previous payload must have been consumed.
  // Returns the "end" section like any other; the caller stops there.
  Result<SectionInfo> next();
  // Reads the whole payload of the current section (at most CAP bytes) and verifies it.
  Result<StateSection> read_section(uint64_t cap = kDefaultSectionCap);
  // Streams the current payload: read LEN bytes into DST, then finish_payload() verifies
  // the checksum once everything was read. DST is written even if the checksum turns out
  // to be bad; callers pass only memory they own (guest RAM being restored).
  Result<void> read_payload(uint8_t* dst, uint64_t len);
  Result<void> finish_payload();

  const SectionInfo& current() const { return current_; }
  const std::string& name() const { return name_; }
  uint32_t format_version() const { return format_version_; }
  bool direct() const { return direct_; }

 private:
  StateFileReader() = default;
  Error error(const std::string& what) const;
  Result<SectionInfo> next_frame();
  Result<void> skip_pad();
  // Reads LEN bytes at the current offset into DST, feeding them to the checksum if HASH.
  Result<void> read_into(uint8_t* dst, uint64_t len, const std::string& what, bool hash);
  Result<size_t> fill(uint64_t want);
  Result<uint64_t> read_bulk(uint8_t* dst, uint64_t len, bool hash);
  Result<uint64_t> read_bulk_uring(uint8_t* dst, uint64_t len, bool hash);
  Result<size_t> read_fd(uint8_t* dst, size_t len, uint64_t at);
  void drop_direct();

  Fd fd_;
  std::string name_;
  uint32_t format_version_ = 0;
  bool direct_ = false;     // fd_ has O_DIRECT: reads aligned in offset, length and memory
  bool seekable_ = false;   // a regular file: pread at file_pos_, several reads in flight
  // Read-ahead buffer for headers and small sections (aligned for O_DIRECT): holds file bytes
  // [file_pos_ - buf_len_, file_pos_), of which the first buf_pos_ are consumed.
  std::unique_ptr<uint8_t, detail::FreeDeleter> buf_;
  size_t buf_len_ = 0;
  size_t buf_pos_ = 0;
  uint64_t file_pos_ = 0;   // file offset of the next byte to read from fd_
  std::unique_ptr<io_uring, detail::RingDeleter> ring_;
  bool ring_failed_ = false;
  uint64_t offset_ = 0;      // bytes consumed so far
  uint64_t remaining_ = 0;   // payload bytes of the current section not yet read
  bool in_payload_ = false;
  SectionInfo current_;
  uint64_t expected_checksum_ = 0;
  struct HashDeleter {
    void operator()(XXH3_state_t* s) const { XXH3_freeState(s); }
  };
  std::unique_ptr<XXH3_state_t, HashDeleter> hash_;
};

// A payload under construction: fixed-size little-endian fields appended in order.
class PayloadWriter {
 public:
  template <class T>
  void put(const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* p = reinterpret_cast<const uint8_t*>(&value);
    data_.insert(data_.end(), p, p + sizeof(T));
  }
  void put_bytes(const void* p, size_t n) {
    data_.insert(data_.end(), static_cast<const uint8_t*>(p), static_cast<const uint8_t*>(p) + n);
  }
  std::vector<uint8_t> take() { return std::move(data_); }

 private:
  std::vector<uint8_t> data_;
};

// The reading side: every get checks the remaining length, so a short payload is an error
// naming the section and the field, never a read past the end.
class PayloadReader {
 public:
  PayloadReader(const StateSection& section) : s_(section) {}
  template <class T>
  Result<void> get(T& value, const char* field) {
    static_assert(std::is_trivially_copyable_v<T>);
    return get_bytes(&value, sizeof(T), field);
  }
  Result<void> get_bytes(void* dst, size_t n, const char* field);
  Result<const uint8_t*> view(size_t n, const char* field);
  size_t remaining() const { return s_.data.size() - pos_; }
  // A section must be consumed exactly: trailing bytes mean a layout this code does not know.
  Result<void> expect_end() const;

 private:
  const StateSection& s_;
  size_t pos_ = 0;
};

}  // namespace kvmig::kvm
