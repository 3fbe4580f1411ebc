#include "helper/fault_point.h"

#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <string>

namespace kvmig::helper {

void fault_point(std::string_view side, std::string_view phase) {
  const char* env = std::getenv("KVMIG_FAULT");
  if (!env || !*env) return;
  std::string want = std::string(side) + ":" + std::string(phase) + ":";
  std::string_view spec(env);
  if (!spec.starts_with(want)) return;
  std::string_view action = spec.substr(want.size());
  std::fprintf(stderr, "kvmig: KVMIG_FAULT %s:%s:%.*s\n", std::string(side).c_str(), std::string(phase).c_str(),
               static_cast<int>(action.size()), action.data());
  std::fflush(stderr);
  if (action == "stop")
    ::raise(SIGSTOP);
  else if (action == "kill")
    ::raise(SIGKILL);
}

}  // namespace kvmig::helper
