/*
 * ent_sim: a simulated SGX ECDSA attester/verifier pair for librats_tls,
 * for ENT's tests only (see README.md).  It proves nothing about a TEE:
 * the "quote" is authenticated with a fixed HMAC key that anyone can read
 * here.
 *
 * Compiled once per library layout, against that library's own headers:
 *   -DENT_SIM_V2025  the 2025 plugin API (verify_evidence takes
 *                    endorsements; the hash is SHA-256 of the claims buffer)
 *   (default)        the 2022 plugin API (the hash is the public key's)
 */

#ifndef ENT_SIM_H
#define ENT_SIM_H

#include <stdint.h>
#include <string.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "sgx_quote_3.h"

#define ENT_SIM_NAME "ent_sim"
/* The evidence format both plugins speak, as the libraries name it. */
#define ENT_SIM_EVIDENCE_TYPE "sgx_ecdsa"

/* Quote header: version 3 with att_key_type 2 (ECDSA P-256) is what the
 * 2025 library requires to call a TEE quote "sgx_ecdsa". */
#define ENT_SIM_QUOTE_VERSION 3
#define ENT_SIM_ATT_KEY_TYPE 2 /* SGX_QL_ALG_ECDSA_P256 */
#define ENT_SIM_VENDOR "ENT-SIM-NOT-SGX"

#define ENT_SIM_MAC_SIZE 32
/* The signature data is the HMAC-SHA256 of header and report body. */
#define ENT_SIM_SIGNED_SIZE (sizeof(sgx_quote_header_t) + sizeof(sgx_report_body_t))
#define ENT_SIM_QUOTE_SIZE (sizeof(sgx_quote3_t) + ENT_SIM_MAC_SIZE)

/* A fixed, public test key: a MAC with it shows only that the quote was not
 * changed on the way, never that a TEE made it. */
static const unsigned char ent_sim_mac_key[] = "ent_sim test key: not a secret, not a TEE";

static inline int ent_sim_mac(const sgx_quote3_t *quote, unsigned char out[ENT_SIM_MAC_SIZE])
{
	unsigned int len = ENT_SIM_MAC_SIZE;
	return HMAC(EVP_sha256(), ent_sim_mac_key, sizeof(ent_sim_mac_key) - 1,
		    (const unsigned char *)quote, ENT_SIM_SIGNED_SIZE, out, &len) != NULL &&
	       len == ENT_SIM_MAC_SIZE;
}

#endif
