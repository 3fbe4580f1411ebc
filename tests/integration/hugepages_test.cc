// `kvmig vm run --hugepages`: guest RAM on hugetlbfs 2 MiB pages, for real. The test reserves
// the pages it needs in the kernel's pool and gives them back afterwards, so it changes
// nothing it did not set.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <string>

#include "test_util.h"

namespace {

const char* kPool = "/proc/sys/vm/nr_hugepages";

long read_long(const char* path) {
  std::ifstream in(path);
  long v = -1;
  in >> v;
  return v;
}

bool write_long(const char* path, long v) {
  std::ofstream out(path);
  out << v;
  out.flush();
  return static_cast<bool>(out);
}

// Grows the 2 MiB pool by `pages` for the test's lifetime.
class HugePagePool {
 public:
  explicit HugePagePool(long pages) : before_(read_long(kPool)) {
    if (before_ < 0 || !write_long(kPool, before_ + pages)) return;
    ok_ = read_long(kPool) >= before_ + pages;
  }
  ~HugePagePool() {
    if (before_ >= 0) write_long(kPool, before_);
  }
  bool ok() const { return ok_; }

 private:
  long before_;
  bool ok_ = false;
};

TEST(HugePages, GuestRunsAndVerifiesOnHugetlbfsPages) {
  if (::access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is not usable here";
  HugePagePool pool(64 + 8);  // 128 MiB of guest RAM, plus slack
  if (!pool.ok()) GTEST_SKIP() << "could not reserve 2 MiB pages in " << kPool << " (needs root)";
  std::string dir = kvmig::test::make_temp_dir("kvmig-hugepages");
  ASSERT_FALSE(dir.empty());
  auto run = kvmig::test::run_kvmig(std::string("vm run --no-control --hugepages --kernel ") +
                                    KVMIG_GUEST + " --memory 128M --cmdline 'ws=32M passes=2' --console " +
                                    dir + "/console");
  std::string console = kvmig::test::read_file(dir + "/console");
  EXPECT_EQ(run.status, 0) << run.err;
  EXPECT_NE(console.find("kvmig-guest: done result=pass passes=2 errors=0"), std::string::npos) << console;
  EXPECT_EQ(console.find("corrupt"), std::string::npos) << console;
  if (!::testing::Test::HasFailure()) std::filesystem::remove_all(dir);
}

TEST(HugePages, EmptyPoolIsAClearError) {
  if (::access("/dev/kvm", R_OK | W_OK) != 0) GTEST_SKIP() << "/dev/kvm is not usable here";
  if (read_long(kPool) != 0) GTEST_SKIP() << "the 2 MiB pool is not empty on this host";
  auto run = kvmig::test::run_kvmig(std::string("vm run --no-control --hugepages --kernel ") +
                                    KVMIG_GUEST + " --memory 128M");
  EXPECT_NE(run.status, 0);
  EXPECT_NE(run.err.find("nr_hugepages"), std::string::npos) << run.err;
  EXPECT_EQ(std::count(run.err.begin(), run.err.end(), '\n'), 1) << run.err;
}

}  // namespace
