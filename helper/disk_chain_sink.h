// The destination's side of a chain copy (docs/disk-chains.md): CHAIN asks what it holds,
// LINK asks it to check every layer and re-link the chain. Each answer comes from the
// destination's own files: a layer counts as held only when the content ID this server computes
// (or finds in a sidecar whose key matches the file) equals the source's, never because the
// source says so.
#pragma once

#include "base/result.h"
#include "helper/disk_copy_sink.h"
#include "helper/disk_messages.h"
#include "helper/transport.h"

namespace kvmig::helper {

// `first` is the CHAIN or LINK message that opened the connection. Replies CHAIN_STATUS or
// LINKED on `control`, or ERROR, and returns a report whose `request` says which.
Result<DiskSinkReport> serve_disk_chain(int root_fd, Stream& control, const DiskMessage& first,
                                        const DiskSinkOptions& options);

}  // namespace kvmig::helper
