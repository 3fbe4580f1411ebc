// <linux/kvm.h> made safe for C++: include this instead of it, before any other Linux uapi
// header that might pull it in.
//
// Why: this Debian's uapi headers define __DECLARE_FLEX_ARRAY as an anonymous struct holding
// an empty struct and the array. An empty struct has size 1 in C++ (0 in C), so in C++
// sizeof(kvm_cpuid2) is 12 instead of 8, kvm_msrs.entries sits at offset 16 instead of 8,
// and every _IOWR() request number computed from those sizes (KVM_GET_SUPPORTED_CPUID,
// KVM_SET_CPUID2, KVM_GET_MSRS, KVM_SET_MSRS, KVM_GET_MSR_INDEX_LIST, KVM_SET_GSI_ROUTING,
// ...) is one KVM does not know: EINVAL. Newer kernels fix the macro for C++ the same way.
#pragma once

#include <linux/stddef.h>

#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]

#include <linux/kvm.h>

// Put this in a .cc after its includes to prove the order was right there. (Not in this
// header: a file that included <linux/kvm.h> first would stop compiling.)
#define KVMIG_CHECK_KVM_UAPI_LAYOUT()                                                       \
  static_assert(sizeof(kvm_cpuid2) == 8 && sizeof(kvm_msrs) == 8 && sizeof(kvm_msr_list) == 4, \
                "<linux/kvm.h> was included before kvm/kvm_uapi.h: its C++ layouts are wrong")
