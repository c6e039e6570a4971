#ifndef DYSCO_CNFTABLES_SHIM_H
#define DYSCO_CNFTABLES_SHIM_H
#include <stdint.h>
#include <nftables/libnftables.h>

/* NFT_CTX_DEFAULT is a macro. */
static inline uint32_t dysco_nft_ctx_default(void) { return NFT_CTX_DEFAULT; }
static inline unsigned int dysco_nft_output_json(void) { return NFT_CTX_OUTPUT_JSON; }
/* Listings without set and map elements (nft -t). */
static inline unsigned int dysco_nft_output_terse(void) { return NFT_CTX_OUTPUT_TERSE; }
#endif
