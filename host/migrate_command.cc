#include "host/migrate_command.h"

#include <memory>
#include <mutex>

#include "host/micro_vm_site.h"
#include "host/site_records.h"
#include "kvm/dirty_tracker.h"

namespace kvmig::host {
namespace {

struct MigrateState {
  std::mutex mu;
  bool running = false;
  std::string last_result;
  // The id of the migration in progress, or of the last one: `kvmig recover --migration ID`
  // asks it to tell this migration's source copy from a later copy of the same VM (one that
  // came back to this site by another migration).
  std::string migration_id;
  helper::MigrationProgress progress;
};

Result<void> check_type(const nlohmann::json& r, const char* key, nlohmann::json::value_t want,
                        const char* what) {
  if (!r.contains(key)) return ok();
  const auto t = r[key].type();
  bool fine = t == want || (want == nlohmann::json::value_t::number_float &&
                            (t == nlohmann::json::value_t::number_integer ||
                             t == nlohmann::json::value_t::number_unsigned)) ||
              (want == nlohmann::json::value_t::number_unsigned && t == nlohmann::json::value_t::number_integer &&
               r[key].get<int64_t>() >= 0);
  if (!fine) return Error{std::string("migrate: \"") + key + "\" must be " + what};
  return ok();
}

}  // namespace

std::string new_migration_id() {
  std::string hex;
  for (char c : random_uuid())
    if (c != '-') hex += c;
  return "mig-" + hex.substr(0, 16);
}

Result<helper::SourceOptions> parse_migrate_request(const nlohmann::json& r) {
  using vt = nlohmann::json::value_t;
  helper::SourceOptions o;
  if (!r.contains("to") || !r["to"].is_string()) return Error{"migrate: needs a string \"to\" (HOST:PORT or unix:PATH)"};
  auto ep = helper::parse_endpoint(r["to"].get<std::string>());
  if (!ep.ok()) return std::move(ep.error().prefix("migrate: \"to\""));
  o.to = *ep;
  KVMIG_TRY(check_type(r, "streams", vt::number_unsigned, "a number of streams"));
  KVMIG_TRY(check_type(r, "verify", vt::boolean, "true or false"));
  KVMIG_TRY(check_type(r, "dirty_tracking", vt::string, "\"bitmap\" or \"ring\""));
  KVMIG_TRY(check_type(r, "granularity", vt::number_unsigned, "a size in bytes"));
  KVMIG_TRY(check_type(r, "max_downtime_ms", vt::number_float, "a number of milliseconds"));
  KVMIG_TRY(check_type(r, "timeout_s", vt::number_float, "a number of seconds"));
  KVMIG_TRY(check_type(r, "migration_id", vt::string, "a string"));
  uint64_t streams = r.value("streams", uint64_t{1});
  if (streams < 1 || streams > static_cast<uint64_t>(helper::kMaxStreams))
    return Error{"migrate: \"streams\" must be 1.." + std::to_string(helper::kMaxStreams)};
  o.streams = static_cast<int>(streams);
  // "auto" | "on" | "off" (default auto, as `kvmig migrate`); true/false from older callers
  // mean on/off.
  o.compress = helper::CompressMode::automatic;
  if (r.contains("compress")) {
    const auto& c = r["compress"];
    if (c.is_boolean()) {
      o.compress = c.get<bool>() ? helper::CompressMode::on : helper::CompressMode::off;
    } else if (c.is_string()) {
      auto mode = helper::parse_compress_mode(c.get<std::string>());
      if (!mode.ok()) return std::move(mode.error().prefix("migrate: \"compress\""));
      o.compress = *mode;
    } else {
      return Error{"migrate: \"compress\" must be \"auto\", \"on\" or \"off\""};
    }
  }
  o.verify = r.value("verify", false);
  std::string tracking = r.value("dirty_tracking", std::string("bitmap"));
  if (tracking != "bitmap" && tracking != "ring")
    return Error{"migrate: \"dirty_tracking\" must be \"bitmap\" or \"ring\", not \"" + tracking + "\""};
  o.ring = tracking == "ring";
  o.granularity = r.value("granularity", uint64_t{4096});
  if (o.granularity < kvm::kMinTraceGranularity || o.granularity > kvm::kMaxTraceGranularity ||
      (o.granularity & (o.granularity - 1)) != 0)
    return Error{"migrate: \"granularity\" must be a power of two from 4K to 2M"};
  double max_downtime_ms = r.value("max_downtime_ms", 5.0);
  if (!(max_downtime_ms > 0 && max_downtime_ms <= 60000))
    return Error{"migrate: \"max_downtime_ms\" must be in (0, 60000]"};
  o.max_downtime = max_downtime_ms / 1000;
  o.timeout = r.value("timeout_s", 60.0);
  if (!(o.timeout >= 0 && o.timeout <= 86400)) return Error{"migrate: \"timeout_s\" must be in [0, 86400]"};
  o.migration_id = r.value("migration_id", std::string());
  if (!o.migration_id.empty()) {
    if (auto c = check_migration_id(o.migration_id); !c.ok()) return std::move(c.error().prefix("migrate: \"migration_id\""));
  }
  return o;
}

void register_migrate_commands(ControlServer& server, kvm::Machine& machine, MigrateIdentity identity) {
  auto state = std::make_shared<MigrateState>();
  if (identity.vm_uuid == std::array<uint8_t, 16>{}) {
    // A VM without a site identity still keeps one UUID for its whole life: a second attempt
    // after a failed migration must name the same VM in the destination's records.
    if (auto b = uuid_bytes(random_uuid()); b.ok()) identity.vm_uuid = *b;
  }
  server.register_command("migrate", [&machine, state, identity](const nlohmann::json& req) -> Result<nlohmann::json> {
    KVMIG_ASSIGN(helper::SourceOptions opt, parse_migrate_request(req));
    // The id is made here rather than in the session so the report can name it: it is what
    // `kvmig status --migration` asks for.
    if (opt.migration_id.empty()) opt.migration_id = new_migration_id();
    opt.vm_uuid = identity.vm_uuid;
    opt.vm_name = identity.vm_name;
    opt.events = identity.events;
    {
      std::lock_guard lock(state->mu);
      if (state->running) return Error{"migrate: a migration of this VM is already in progress"};
      if (state->last_result == "completed" || state->last_result == "in-doubt")
        return Error{"migrate: this VM was already migrated away (" + state->last_result + ")"};
      state->running = true;
      state->migration_id = opt.migration_id;
      state->progress.phase = helper::kSetup;
      state->progress.iteration = 0;
      state->progress.transferred = 0;
    }
    helper::MigrationReport report = helper::migrate_machine(machine, opt, &state->progress);
    std::lock_guard lock(state->mu);
    state->running = false;
    state->last_result = report.result;
    nlohmann::json j = report.to_json();
    j["migration_id"] = opt.migration_id;
    j["vm_uuid"] = uuid_text(opt.vm_uuid);
    return j;
  });
  server.register_command("migrate-progress", [state](const nlohmann::json&) -> Result<nlohmann::json> {
    nlohmann::json j = state->progress.to_json();
    std::lock_guard lock(state->mu);
    j["running"] = state->running;
    j["migration_id"] = state->migration_id;  // "" when this VM never was a migration source
    return j;
  });
  server.register_command("migrate-finish", [&machine, state](const nlohmann::json&) -> Result<nlohmann::json> {
    std::lock_guard lock(state->mu);
    if (state->last_result != "completed")
      return Error{"migrate-finish: no completed migration of this VM (last: " +
                   (state->last_result.empty() ? std::string("none") : state->last_result) + ")"};
    machine.stop(0);
    return nlohmann::json{{"stopping", true}};
  });
}

}  // namespace kvmig::host
