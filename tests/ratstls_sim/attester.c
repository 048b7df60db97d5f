/*
 * The ent_sim attester: evidence in the SGX ECDSA quote format (sgx_quote3_t)
 * whose report body comes from the environment, read at each collection
 * (the library collects once per handle, in rats_tls_init):
 *
 *   ENT_SIM_MRENCLAVE  64 hex digits   default 0123456789abcdef x 4
 *   ENT_SIM_MRSIGNER   64 hex digits   default fedcba9876543210 x 4
 *   ENT_SIM_ISVPRODID  0..65535        default 1
 *   ENT_SIM_ISVSVN     0..65535        default 1
 *   ENT_SIM_DEBUG      0 or 1          default 0 (1 sets attributes.flags bit 1)
 *   ENT_SIM_TAMPER     0 or 1          default 0 (1: flip a report body byte
 *                                      after the MAC, to test rejection)
 *
 * A malformed value fails the collection.  report_data starts with the hash
 * the library hands over (2022: of the public key; 2025: of the claims
 * buffer, which holds the public key's hash and the custom claims), which
 * is what the library's verifier side gives the verifier to check.
 */

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <rats-tls/log.h>
#include <rats-tls/attester.h>

#include "ent_sim.h"

#define DEFAULT_MRENCLAVE "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
#define DEFAULT_MRSIGNER "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"
#define DEFAULT_ISVPRODID 1
#define DEFAULT_ISVSVN 1

extern enclave_attester_err_t enclave_attester_register(enclave_attester_opts_t *);

static int hexval(int c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	c = tolower(c);
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

static int env_measurement(const char *name, const char *fallback, uint8_t out[32])
{
	const char *text = getenv(name);
	if (!text)
		text = fallback;
	if (strlen(text) != 64) {
		RTLS_ERR("ent_sim: %s must be 64 hex digits, not '%s'\n", name, text);
		return 0;
	}
	for (int i = 0; i < 32; i++) {
		int hi = hexval((unsigned char)text[2 * i]), lo = hexval((unsigned char)text[2 * i + 1]);
		if (hi < 0 || lo < 0) {
			RTLS_ERR("ent_sim: %s must be 64 hex digits, not '%s'\n", name, text);
			return 0;
		}
		out[i] = (uint8_t)(hi << 4 | lo);
	}
	return 1;
}

static int env_number(const char *name, unsigned long fallback, unsigned long max, unsigned long *out)
{
	const char *text = getenv(name);
	if (!text) {
		*out = fallback;
		return 1;
	}
	size_t len = strlen(text);
	if (len == 0 || len > 10)
		goto bad;
	for (size_t i = 0; i < len; i++)
		if (!isdigit((unsigned char)text[i]))
			goto bad;
	errno = 0;
	*out = strtoul(text, NULL, 10);
	if (errno || *out > max)
		goto bad;
	return 1;
bad:
	RTLS_ERR("ent_sim: %s must be a decimal number from 0 to %lu, not '%s'\n", name, max, text);
	return 0;
}

static enclave_attester_err_t ent_sim_pre_init(void)
{
	return ENCLAVE_ATTESTER_ERR_NONE;
}

static unsigned int dummy_private;

static enclave_attester_err_t ent_sim_init(enclave_attester_ctx_t *ctx,
					   __attribute__((unused)) rats_tls_cert_algo_t algo)
{
	ctx->attester_private = &dummy_private;
	return ENCLAVE_ATTESTER_ERR_NONE;
}

static enclave_attester_err_t ent_sim_collect_evidence(__attribute__((unused)) enclave_attester_ctx_t *ctx,
						       attestation_evidence_t *evidence,
						       __attribute__((unused)) rats_tls_cert_algo_t algo,
						       uint8_t *hash, uint32_t hash_len)
{
	sgx_quote3_t *quote = (sgx_quote3_t *)evidence->ecdsa.quote;
	unsigned long prodid, svn, debug, tamper;

	_Static_assert(ENT_SIM_QUOTE_SIZE <= sizeof(evidence->ecdsa.quote), "quote fits");
	if (!hash || hash_len == 0 || hash_len > sizeof(quote->report_body.report_data.d)) {
		RTLS_ERR("ent_sim: bad hash from the library (%u bytes)\n", hash_len);
		return -ENCLAVE_ATTESTER_ERR_INVALID;
	}

	memset(evidence->ecdsa.quote, 0, ENT_SIM_QUOTE_SIZE);
	if (!env_measurement("ENT_SIM_MRENCLAVE", DEFAULT_MRENCLAVE, quote->report_body.mr_enclave.m) ||
	    !env_measurement("ENT_SIM_MRSIGNER", DEFAULT_MRSIGNER, quote->report_body.mr_signer.m) ||
	    !env_number("ENT_SIM_ISVPRODID", DEFAULT_ISVPRODID, 0xffff, &prodid) ||
	    !env_number("ENT_SIM_ISVSVN", DEFAULT_ISVSVN, 0xffff, &svn) ||
	    !env_number("ENT_SIM_DEBUG", 0, 1, &debug) || !env_number("ENT_SIM_TAMPER", 0, 1, &tamper))
		return -ENCLAVE_ATTESTER_ERR_INVALID;

	quote->header.version = ENT_SIM_QUOTE_VERSION;
	quote->header.att_key_type = ENT_SIM_ATT_KEY_TYPE;
	memcpy(quote->header.vendor_id, ENT_SIM_VENDOR, sizeof(quote->header.vendor_id));
	quote->report_body.isv_prod_id = (sgx_prod_id_t)prodid;
	quote->report_body.isv_svn = (sgx_isv_svn_t)svn;
	quote->report_body.attributes.flags =
		SGX_FLAGS_INITTED | SGX_FLAGS_MODE64BIT | (debug ? SGX_FLAGS_DEBUG : 0);
	quote->report_body.attributes.xfrm = SGX_XFRM_LEGACY;
	memcpy(quote->report_body.report_data.d, hash, hash_len);
	quote->signature_data_len = ENT_SIM_MAC_SIZE;
	if (!ent_sim_mac(quote, quote->signature_data)) {
		RTLS_ERR("ent_sim: HMAC failed\n");
		return -ENCLAVE_ATTESTER_ERR_UNKNOWN;
	}
	if (tamper)
		quote->report_body.mr_enclave.m[0] ^= 0x01;

	/* What both libraries key the sgx_ecdsa handling on: the 2022 one
	 * puts the quote under the SGX ECDSA quote OID, the 2025 one under the
	 * TEE quote CBOR tag. */
	snprintf(evidence->type, sizeof(evidence->type), "%s", ENT_SIM_EVIDENCE_TYPE);
	evidence->ecdsa.quote_len = ENT_SIM_QUOTE_SIZE;
	RTLS_DEBUG("ent_sim: simulated quote of %zu bytes\n", ENT_SIM_QUOTE_SIZE);
	return ENCLAVE_ATTESTER_ERR_NONE;
}

static enclave_attester_err_t ent_sim_cleanup(__attribute__((unused)) enclave_attester_ctx_t *ctx)
{
	return ENCLAVE_ATTESTER_ERR_NONE;
}

static enclave_attester_opts_t ent_sim_opts = {
	.api_version = ENCLAVE_ATTESTER_API_VERSION_DEFAULT,
	.flags = ENCLAVE_ATTESTER_FLAGS_DEFAULT,
	.name = ENT_SIM_NAME,
	.type = ENT_SIM_EVIDENCE_TYPE,
	.priority = 0,
	.pre_init = ent_sim_pre_init,
	.init = ent_sim_init,
	.collect_evidence = ent_sim_collect_evidence,
	.cleanup = ent_sim_cleanup,
};

void __attribute__((constructor)) libattester_ent_sim_init(void)
{
	enclave_attester_err_t err = enclave_attester_register(&ent_sim_opts);
	if (err != ENCLAVE_ATTESTER_ERR_NONE)
		RTLS_ERR("failed to register the enclave attester 'ent_sim' %#x\n", err);
}
