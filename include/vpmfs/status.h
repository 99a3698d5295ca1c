// Errors across vpmfs layers: an errno value the FUSE layer can return as is, plus a message
// for people. No exceptions cross a layer boundary.
#pragma once

#include <cerrno>
#include <string>
#include <utility>
#include <variant>

namespace vpmfs {

class Status {
 public:
  Status() = default;
  Status(int error, std::string message) : error_(error), message_(std::move(message)) {}

  static Status ok() { return Status(); }

  bool is_ok() const { return error_ == 0; }
  explicit operator bool() const { return is_ok(); }
  // The errno value (EIO, ENOSPC, ...); 0 when ok.
  int error() const { return error_; }
  const std::string& message() const { return message_; }
  // "message (strerror)" for logs and tool output.
  std::string to_string() const;

 private:
  int error_ = 0;
  std::string message_;
};

// A value or the Status explaining why there is none.
template <typename T>
class Result {
 public:
  Result(T value) : v_(std::move(value)) {}         // NOLINT: implicit by design
  Result(Status status) : v_(std::move(status)) {}  // NOLINT: implicit by design

  bool is_ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return is_ok(); }
  T& value() & { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  const T& value() const& { return std::get<T>(v_); }
  T* operator->() { return &value(); }
  T& operator*() { return value(); }
  const T* operator->() const { return &value(); }
  const T& operator*() const { return value(); }
  Status status() const { return is_ok() ? Status() : std::get<Status>(v_); }

 private:
  std::variant<T, Status> v_;
};

// Status from the current errno, with context: errno_status("open " + path).
Status errno_status(const std::string& context);

}  // namespace vpmfs
