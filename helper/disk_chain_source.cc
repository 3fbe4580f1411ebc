#include "helper/disk_chain_source.h"

namespace kvmig::helper {
namespace {

Result<DiskMessage> ask(Connection& connection, DiskMsg request, const DiskChain& chain, DiskMsg reply) {
  if (!connection.control || connection.data.empty())
    return Error{"a chain request needs a control and a data stream"};
  KVMIG_TRY(validate(chain));
  KVMIG_TRY(send_disk(*connection.data[0], request, encode(chain)));
  KVMIG_ASSIGN(DiskMessage m, read_disk(*connection.control));
  connection.control->shutdown();
  connection.data[0]->shutdown();
  if (m.type() == DiskMsg::error) return disk_peer_error(m);
  if (m.type() != reply)
    return wire_error(WireCode::unexpected, std::string(disk_msg_name(m.type())) + " instead of " +
                                                disk_msg_name(reply));
  return m;
}

}  // namespace

Result<std::vector<LayerStatus>> query_disk_chain(Connection& connection, const DiskChain& chain) {
  KVMIG_ASSIGN(DiskMessage m, ask(connection, DiskMsg::chain, chain, DiskMsg::chain_status));
  return decode_layer_statuses(m.payload, chain.layers.size());
}

Result<void> link_disk_chain(Connection& connection, const DiskChain& chain) {
  KVMIG_ASSIGN(DiskMessage m, ask(connection, DiskMsg::link, chain, DiskMsg::linked));
  KVMIG_ASSIGN(uint64_t count, decode_disk_u64(m.payload, "LINKED"));
  if (count != chain.layers.size())
    return wire_error(WireCode::malformed, "LINKED " + std::to_string(count) + " layers of " +
                                               std::to_string(chain.layers.size()));
  return ok();
}

}  // namespace kvmig::helper
