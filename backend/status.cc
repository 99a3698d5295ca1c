#include "vpmfs/status.h"

#include <cstring>

namespace vpmfs {

std::string Status::to_string() const {
  if (is_ok()) return "ok";
  return message_ + " (" + std::strerror(error_) + ")";
}

Status errno_status(const std::string& context) {
  int e = errno;
  return Status(e == 0 ? EIO : e, context);
}

}  // namespace vpmfs
