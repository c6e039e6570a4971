#ifndef DYSCO_CLIBBPF_SHIM_H
#define DYSCO_CLIBBPF_SHIM_H
/* libbpf (Debian's 1.1: bpf_tc_* for clsact, ring buffers; no tcx API) and the BPF datapath's map layout, which
   the tc programs (bpf/dysco.bpf.c) include too. libbpf 1.x reports failures as a negative errno *and* sets
   errno (pointer-returning calls: NULL and errno), so sysCall (DyscoSystem) covers every call. */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <net/if.h>
#include <bpf/libbpf.h>
#include <bpf/bpf.h>
#include "dysco_bpf.h"

/* Opts structs carry their own size (LIBBPF_OPTS is a macro): build them here. */

/* Opens an object file; with pin_root (a directory on a bpffs), maps marked LIBBPF_PIN_BY_NAME are pinned there
   at load, or reused if already pinned (a restarted agent finds its maps). Without it nothing is pinned (libbpf
   would otherwise pin to /sys/fs/bpf). */
static inline struct bpf_object *dysco_bpf_open(const char *path, const char *pin_root) {
    LIBBPF_OPTS(bpf_object_open_opts, opts, .pin_root_path = pin_root);
    struct bpf_object *object = bpf_object__open_file(path, &opts);
    if (object && !pin_root) {
        struct bpf_map *map;
        bpf_object__for_each_map(map, object) {
            int err = bpf_map__set_pin_path(map, NULL);
            if (err) {
                bpf_object__close(object);
                errno = -err;
                return NULL;
            }
        }
    }
    return object;
}

static inline int dysco_tc_ingress(void) { return BPF_TC_INGRESS; }
static inline int dysco_tc_egress(void) { return BPF_TC_EGRESS; }

/* Creates the clsact qdisc on a device of the calling thread's network namespace (-EEXIST if it is there). */
static inline int dysco_tc_hook_create(int ifindex) {
    LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex, .attach_point = BPF_TC_INGRESS);
    return bpf_tc_hook_create(&hook);
}

/* Removes the clsact qdisc of a device, with every filter on it. */
static inline int dysco_tc_hook_destroy(int ifindex) {
    LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex,
                .attach_point = (enum bpf_tc_attach_point)(BPF_TC_INGRESS | BPF_TC_EGRESS));
    return bpf_tc_hook_destroy(&hook);
}

/* Attaches (or replaces) a direct-action classifier at handle/priority; returns the program id via prog_id. */
static inline int dysco_tc_attach(int ifindex, int attach_point, int prog_fd, uint32_t handle, uint32_t priority,
                                  uint32_t *prog_id) {
    LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex, .attach_point = (enum bpf_tc_attach_point)attach_point);
    LIBBPF_OPTS(bpf_tc_opts, opts, .prog_fd = prog_fd, .handle = handle, .priority = priority,
                .flags = BPF_TC_F_REPLACE);
    int err = bpf_tc_attach(&hook, &opts);
    if (err == 0 && prog_id) *prog_id = opts.prog_id;
    return err;
}

static inline int dysco_tc_detach(int ifindex, int attach_point, uint32_t handle, uint32_t priority) {
    LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex, .attach_point = (enum bpf_tc_attach_point)attach_point);
    LIBBPF_OPTS(bpf_tc_opts, opts, .handle = handle, .priority = priority);
    return bpf_tc_detach(&hook, &opts);
}

/* The id of the program attached at handle/priority (-ENOENT if none). */
static inline int dysco_tc_query(int ifindex, int attach_point, uint32_t handle, uint32_t priority,
                                 uint32_t *prog_id) {
    LIBBPF_OPTS(bpf_tc_hook, hook, .ifindex = ifindex, .attach_point = (enum bpf_tc_attach_point)attach_point);
    LIBBPF_OPTS(bpf_tc_opts, opts, .handle = handle, .priority = priority);
    int err = bpf_tc_query(&hook, &opts);
    if (err == 0 && prog_id) *prog_id = opts.prog_id;
    return err;
}

/* if_nametoindex returns 0 on failure: map it to -1 (errno set) for sysCall. */
static inline int dysco_ifindex(const char *name) {
    unsigned int index = if_nametoindex(name);
    return index == 0 ? -1 : (int)index;
}

/* Batch updates and deletes (one syscall for many entries; *count: in, how many; out, how many were done). */
static inline int dysco_map_update_batch(int fd, const void *keys, const void *values, uint32_t *count,
                                         uint64_t elem_flags) {
    LIBBPF_OPTS(bpf_map_batch_opts, opts, .elem_flags = elem_flags);
    return bpf_map_update_batch(fd, keys, values, count, &opts);
}
static inline int dysco_map_delete_batch(int fd, const void *keys, uint32_t *count) {
    LIBBPF_OPTS(bpf_map_batch_opts, opts);
    return bpf_map_delete_batch(fd, keys, count, &opts);
}

/* The layout of the map behind fd (key and value sizes, max_entries): a restarted agent compares a pinned map's with
 * what it would create (libbpf refuses to reuse a pinned map whose parameters differ). 0 or -errno, like libbpf. */
static inline int dysco_map_layout(int fd, uint32_t *key_size, uint32_t *value_size, uint32_t *max_entries) {
    struct bpf_map_info info;
    uint32_t length = sizeof(info);
    memset(&info, 0, sizeof(info));
    int result = bpf_obj_get_info_by_fd(fd, &info, &length);
    if (result == 0) {
        *key_size = info.key_size;
        *value_size = info.value_size;
        *max_entries = info.max_entries;
    }
    return result;
}

/* Update modes of bpf_map_update_elem (macros). */
static inline uint64_t dysco_bpf_any(void) { return BPF_ANY; }
static inline uint64_t dysco_bpf_noexist(void) { return BPF_NOEXIST; }
static inline uint64_t dysco_bpf_exist(void) { return BPF_EXIST; }
#endif
