/*
 * The ent_sim verifier: accepts only ent_sim quotes (sgx_quote3_t, see
 * attester.c) that are unchanged (their HMAC matches) and bound to what the
 * library asks (report_data starts with the hash it hands over: 2022 the
 * peer certificate's public key hash, 2025 the hash of the claims buffer,
 * which the library then checks against the key itself).
 */

#include <stdio.h>
#include <rats-tls/log.h>
#include <rats-tls/verifier.h>

#include "ent_sim.h"

extern enclave_verifier_err_t enclave_verifier_register(enclave_verifier_opts_t *);

static enclave_verifier_err_t ent_sim_pre_init(void)
{
	return ENCLAVE_VERIFIER_ERR_NONE;
}

static unsigned int dummy_private;

static enclave_verifier_err_t ent_sim_init(enclave_verifier_ctx_t *ctx,
					   __attribute__((unused)) rats_tls_cert_algo_t algo)
{
	ctx->verifier_private = &dummy_private;
	return ENCLAVE_VERIFIER_ERR_NONE;
}

static enclave_verifier_err_t check(attestation_evidence_t *evidence, uint8_t *hash, uint32_t hash_len)
{
	const sgx_quote3_t *quote = (const sgx_quote3_t *)evidence->ecdsa.quote;
	unsigned char mac[ENT_SIM_MAC_SIZE];

	if (strncmp(evidence->type, ENT_SIM_EVIDENCE_TYPE, sizeof(evidence->type))) {
		RTLS_ERR("ent_sim: evidence of type '%.32s', not an ent_sim quote\n", evidence->type);
		return -ENCLAVE_VERIFIER_ERR_INVALID;
	}
	if (evidence->ecdsa.quote_len != ENT_SIM_QUOTE_SIZE || quote->header.version != ENT_SIM_QUOTE_VERSION ||
	    quote->header.att_key_type != ENT_SIM_ATT_KEY_TYPE ||
	    memcmp(quote->header.vendor_id, ENT_SIM_VENDOR, sizeof(quote->header.vendor_id)) ||
	    quote->signature_data_len != ENT_SIM_MAC_SIZE) {
		RTLS_ERR("ent_sim: not an ent_sim quote (%u bytes)\n", evidence->ecdsa.quote_len);
		return -ENCLAVE_VERIFIER_ERR_INVALID;
	}
	if (!ent_sim_mac(quote, mac) || CRYPTO_memcmp(mac, quote->signature_data, ENT_SIM_MAC_SIZE)) {
		RTLS_ERR("ent_sim: the quote was altered (its MAC does not match)\n");
		return -ENCLAVE_VERIFIER_ERR_INVALID;
	}
	if (!hash || hash_len == 0 || hash_len > sizeof(quote->report_body.report_data.d) ||
	    memcmp(quote->report_body.report_data.d, hash, hash_len)) {
		RTLS_ERR("ent_sim: the quote's report data is not bound to this certificate\n");
		return -ENCLAVE_VERIFIER_ERR_INVALID;
	}
	for (size_t i = hash_len; i < sizeof(quote->report_body.report_data.d); i++)
		if (quote->report_body.report_data.d[i]) {
			RTLS_ERR("ent_sim: unexpected bytes after the hash in the report data\n");
			return -ENCLAVE_VERIFIER_ERR_INVALID;
		}
	RTLS_DEBUG("ent_sim: quote accepted\n");
	return ENCLAVE_VERIFIER_ERR_NONE;
}

#ifdef ENT_SIM_V2025
static enclave_verifier_err_t ent_sim_verify_evidence(__attribute__((unused)) enclave_verifier_ctx_t *ctx,
						      attestation_evidence_t *evidence, uint8_t *hash,
						      uint32_t hash_len,
						      __attribute__((unused)) attestation_endorsement_t *endorsements)
#else
static enclave_verifier_err_t ent_sim_verify_evidence(__attribute__((unused)) enclave_verifier_ctx_t *ctx,
						      attestation_evidence_t *evidence, uint8_t *hash,
						      uint32_t hash_len)
#endif
{
	return check(evidence, hash, hash_len);
}

static enclave_verifier_err_t ent_sim_cleanup(__attribute__((unused)) enclave_verifier_ctx_t *ctx)
{
	return ENCLAVE_VERIFIER_ERR_NONE;
}

static enclave_verifier_opts_t ent_sim_opts = {
	.api_version = ENCLAVE_VERIFIER_API_VERSION_DEFAULT,
	.flags = ENCLAVE_VERIFIER_OPTS_FLAGS_DEFAULT,
	.name = ENT_SIM_NAME,
	.type = ENT_SIM_EVIDENCE_TYPE,
	.priority = 0,
	.pre_init = ent_sim_pre_init,
	.init = ent_sim_init,
	.verify_evidence = ent_sim_verify_evidence,
	.cleanup = ent_sim_cleanup,
};

void __attribute__((constructor)) libverifier_ent_sim_init(void)
{
	enclave_verifier_err_t err = enclave_verifier_register(&ent_sim_opts);
	if (err != ENCLAVE_VERIFIER_ERR_NONE)
		RTLS_ERR("failed to register the enclave verifier 'ent_sim' %#x\n", err);
}
