// fault_point(): a test hook that stops or ends this process at a named step of a migration,
// so the fault tests (tests/integration/fault_*_test.cc) can kill a side, cut the link or fill
// the destination's disk in exactly that phase instead of racing a timer.
//
//   KVMIG_FAULT=<side>:<phase>:<action>      e.g. KVMIG_FAULT=destination:commit:stop
//     side    source | destination
//     phase   hello   destination: migration-started record and placeholder written, before HELLO_ACK
//             precopy source: the first pre-copy round sent, the next not begun
//             ready   source: READY read, before COMMIT is sent
//             commit  destination: COMMIT read, before the completion is recorded
//             tagged  destination: placeholder tagged and completion recorded (durable), before
//                     the first vCPU run (host/micro_vm_site.cc)
//     action  stop    raise(SIGSTOP): the test sees state 'T' in /proc/PID/stat, does its fault,
//                     then SIGCONT (or SIGKILL)
//             kill    raise(SIGKILL): the kill -9 of that side, at that instant
//
// Unset (every real run), it costs one getenv() per call and does nothing. It is compiled in
// always, on purpose: a fault test must exercise the very binary users run.
#pragma once

#include <string_view>

namespace kvmig::helper {

void fault_point(std::string_view side, std::string_view phase);

}  // namespace kvmig::helper
