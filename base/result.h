// Result<T>: a value or an Error, for system-call boundaries (a std::expected until C++23).
// Errors carry errno and the name of the call that failed, so a message can say
// "KVM_SET_USER_MEMORY_REGION slot 1: Invalid argument" rather than "ioctl failed".
#pragma once

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <variant>

namespace kvmig {

struct Error {
  std::string message;  // one line, with context: which call, which object
  int sys_errno = 0;    // 0 when the error is not from a system call

  static Error from_errno(std::string what, int err = errno) {
    return Error{what + ": " + std::strerror(err), err};
  }
  Error& prefix(const std::string& context) {
    message = context + ": " + message;
    return *this;
  }
};

template <class T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}
  Result(Error error) : v_(std::move(error)) {}

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const { return std::get<1>(v_); }
  Error& error() { return std::get<1>(v_); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : error_(std::move(error)), failed_(true) {}

  bool ok() const { return !failed_; }
  explicit operator bool() const { return ok(); }
  const Error& error() const { return error_; }
  Error& error() { return error_; }

 private:
  Error error_;
  bool failed_ = false;
};

inline Result<void> ok() { return {}; }

}  // namespace kvmig

// Propagate an error from a Result-returning expression: KVMIG_TRY(vm.pause());
#define KVMIG_TRY(expr)                              \
  do {                                               \
    auto kvmig_try_result_ = (expr);                 \
    if (!kvmig_try_result_.ok())                     \
      return std::move(kvmig_try_result_.error());   \
  } while (0)

// Bind a value or propagate: KVMIG_ASSIGN(fd, open_thing());
#define KVMIG_CONCAT_INNER_(a, b) a##b
#define KVMIG_CONCAT_(a, b) KVMIG_CONCAT_INNER_(a, b)
#define KVMIG_ASSIGN_IMPL_(tmp, lhs, expr)   \
  auto tmp = (expr);                          \
  if (!tmp.ok()) return std::move(tmp.error()); \
  lhs = std::move(tmp).value()
#define KVMIG_ASSIGN(lhs, expr) KVMIG_ASSIGN_IMPL_(KVMIG_CONCAT_(kvmig_assign_, __LINE__), lhs, expr)
