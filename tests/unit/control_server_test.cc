// The control socket's request handling, and a real unix-socket round trip (no KVM needed).
#include <gtest/gtest.h>

#include <unistd.h>

#include "host/control_server.h"

namespace kvmig::host {
namespace {

nlohmann::json parse(const std::string& s) { return nlohmann::json::parse(s); }

TEST(ControlServer, DispatchesRegisteredCommands) {
  ControlServer server;
  int calls = 0;
  server.register_command("ping", [&](const nlohmann::json& req) -> Result<nlohmann::json> {
    ++calls;
    return nlohmann::json{{"echo", req.value("x", 0)}};
  });
  auto reply = parse(server.handle_line(R"({"cmd":"ping","x":42})"));
  EXPECT_EQ(reply["ok"], true);
  EXPECT_EQ(reply["echo"], 42);
  EXPECT_EQ(calls, 1);
}

TEST(ControlServer, ErrorsAreRepliesNotCrashes) {
  ControlServer server;
  server.register_command("fail", [](const nlohmann::json&) -> Result<nlohmann::json> { return Error{"it broke"}; });
  server.register_command("throw", [](const nlohmann::json&) -> Result<nlohmann::json> {
    throw std::runtime_error("boom");
  });
  auto r1 = parse(server.handle_line(R"({"cmd":"fail"})"));
  EXPECT_EQ(r1["ok"], false);
  EXPECT_EQ(r1["error"], "it broke");
  auto r2 = parse(server.handle_line("{not json"));
  EXPECT_EQ(r2["ok"], false);
  EXPECT_NE(r2["error"].get<std::string>().find("not valid JSON"), std::string::npos);
  auto r3 = parse(server.handle_line(R"({"cmd":"nope"})"));
  EXPECT_NE(r3["error"].get<std::string>().find("unknown command 'nope' (known: fail, throw)"), std::string::npos);
  auto r4 = parse(server.handle_line(R"([1,2])"));
  EXPECT_EQ(r4["ok"], false);
  auto r5 = parse(server.handle_line(R"({"cmd":"throw"})"));
  EXPECT_EQ(r5["ok"], false);
  EXPECT_NE(r5["error"].get<std::string>().find("boom"), std::string::npos);
}

TEST(ControlServer, ServesOverUnixSocketAndCleansUp) {
  std::string path = "/tmp/kvmig-control-test-" + std::to_string(::getpid()) + ".sock";
  ControlServer server;
  server.register_command("stats", [](const nlohmann::json&) -> Result<nlohmann::json> {
    return nlohmann::json{{"n", 7}};
  });
  ASSERT_TRUE(server.start(path).ok());
  auto reply = control_request(path, {{"cmd", "stats"}});
  ASSERT_TRUE(reply.ok()) << reply.error().message;
  EXPECT_EQ((*reply)["n"], 7);
  EXPECT_EQ((*reply)["ok"], true);

  ControlServer second;
  auto busy = second.start(path);
  ASSERT_FALSE(busy.ok());
  EXPECT_NE(busy.error().message.find("in use"), std::string::npos);

  server.stop();
  EXPECT_NE(::access(path.c_str(), F_OK), 0);
  EXPECT_FALSE(control_request(path, {{"cmd", "stats"}}).ok());
}

}  // namespace
}  // namespace kvmig::host
