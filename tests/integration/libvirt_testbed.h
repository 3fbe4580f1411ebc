// A two-host testbed (scripts/testbed) for tests on real libvirtd: bring up, tear down, run a
// command in a host, reach each host's libvirtd and site from outside, restart a libvirtd, and
// the test guest as a small libvirt domain (direct kernel boot, TCG, console on port 0xe9
// appended to a file both hosts see).
#pragma once

#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "test_util.h"

namespace kvmig::test {

// The test guest as a libvirt domain, small (a group of three must be cheap to move). `kvm`:
// hardware virtualization, the CPU passed through without arch-capabilities (which kvm-pvm
// refuses); else TCG, which boots faster on kvm-pvm (no emulated firmware at CPL0) but whose
// dirty tracking is QEMU's, not KVM's.
inline std::string guest_domain_xml(const std::string& name, const std::string& uuid, const std::string& kernel,
                                    const std::string& console, const std::string& cmdline, int memory_mib,
                                    bool kvm) {
  return std::string("<domain type='") + (kvm ? "kvm" : "qemu") +
         "' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>"
         "<name>" + name + "</name><uuid>" + uuid + "</uuid>"
         "<memory unit='MiB'>" + std::to_string(memory_mib) + "</memory><vcpu>1</vcpu>" +
         (kvm ? "<cpu mode='host-passthrough'><feature policy='disable' name='arch-capabilities'/></cpu>" : "") +
         "<os><type arch='x86_64' machine='pc'>hvm</type><kernel>" + kernel + "</kernel>"
         "<cmdline>" + cmdline + "</cmdline></os>"
         "<on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>"
         "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator><memballoon model='none'/></devices>"
         "<qemu:commandline>"
         "<qemu:arg value='-device'/><qemu:arg value='isa-debugcon,iobase=0xe9,chardev=kvmigcon'/>"
         "<qemu:arg value='-chardev'/><qemu:arg value='file,id=kvmigcon,path=" + console + ",append=on'/>"
         "</qemu:commandline></domain>";
}

class Testbed {
 public:
  // Brings up `name` with two hosts; error() says why not (empty: up).
  explicit Testbed(const std::string& name) : name_(name), state_("/run/" + name) {
    env_ = "KVMIG=" KVMIG_BINARY " KVMIG_TESTBED_NAME=" + name_ + " " KVMIG_SOURCE_DIR "/scripts/testbed ";
    ShellRun up = run_shell(env_ + "up 2");
    if (up.status != 0) error_ = "libvirtd cannot start in the testbed: " + up.out;
  }
  ~Testbed() {
    if (std::filesystem::exists(state_)) (void)run_shell(env_ + "down");
  }
  Testbed(const Testbed&) = delete;
  Testbed& operator=(const Testbed&) = delete;

  const std::string& error() const { return error_; }
  const std::string& name() const { return name_; }
  std::string host_dir(int h) const { return state_ + "/h" + std::to_string(h); }
  std::string uri(int h) const { return "qemu+unix:///system?socket=" + host_dir(h) + "/run/libvirt/libvirt-sock"; }
  std::string site(int h) const { return host_dir(h) + "/var/lib/kvmig/site"; }
  std::string netns(int h) const { return name_ + "-h" + std::to_string(h); }
  // The address of host `h` on its link with the other host (10.77.12.h).
  static std::string address(int h) { return "10.77.12." + std::to_string(h); }
  ShellRun exec(int h, const std::string& cmd) const { return run_shell(env_ + "exec " + std::to_string(h) + " " + cmd); }

  // The pid in a pid file under host `h`'s directory (0: none).
  pid_t pid_of(int h, const std::string& pid_file) const {
    std::ifstream f(host_dir(h) + "/" + pid_file);
    pid_t pid = 0;
    f >> pid;
    return pid > 1 ? pid : 0;
  }
  pid_t libvirtd_pid(int h) const { return pid_of(h, "run/libvirt/libvirtd.pid"); }
  pid_t qemu_pid(int h, const std::string& domain) const { return pid_of(h, "run/libvirt/qemu/" + domain + ".pid"); }

  bool libvirtd_answers(int h, int seconds) const {
    for (int i = 0; i < seconds * 10; ++i) {
      if (exec(h, "virsh -c qemu:///system uri").status == 0) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    return false;
  }
  // Starts host h's libvirtd again (after it was killed); true once it answers.
  bool start_libvirtd(int h) const {
    ShellRun r = exec(h, "libvirtd --daemon --pid-file /run/libvirt/libvirtd.pid --config /etc/libvirt/libvirtd.conf");
    return r.status == 0 && libvirtd_answers(h, 20);
  }
  // The veth link between the hosts, both ends (a cable pulled, or put back).
  bool set_link(bool up) const {
    const char* state = up ? "up" : "down";
    return run_shell("ip -n " + netns(1) + " link set tb12a " + state).status == 0 &&
           run_shell("ip -n " + netns(2) + " link set tb12b " + state).status == 0;
  }

 private:
  std::string name_, state_, env_, error_;
};

}  // namespace kvmig::test
