/*
 * A stand-in for librats_tls.so (rats-tls 0.6.4, host mode) for ENT's tests.
 *
 * Same C API, same struct layout (chosen at compile time) and the same
 * behaviour as described in shared/RATS-TLS.md, over a real TLS 1.3 session
 * made with OpenSSL.  Attestation is "null": each side puts a fixed evidence
 * blob into a custom extension of its self-signed ECDSA P-256 certificate,
 * and the verifier accepts any peer certificate that carries it.
 *
 * Build with tests/ratstls_mock/build.sh, which sets:
 *   -DRATS_LAYOUT_2025 (default) or -DRATS_LAYOUT_2022
 *   -DRATS_PLUGIN_DIR="/abs/dir/rats-tls"
 *
 * Threading: one thread may block in rats_tls_receive while another calls
 * rats_tls_transmit on the same handle, and rats_tls_cleanup may be called
 * while either is blocked (they return -RATS_TLS_ERR_INVALID promptly).
 * On a non-blocking fd a call that would wait returns -2 with errno EAGAIN
 * instead, like upstream (see fd_nonblocking).
 * All SSL calls are made under one mutex with non-blocking socket I/O
 * (recv/send with MSG_DONTWAIT; the fd's own flags are never changed);
 * a thread that must wait for the socket drops the mutex and poll()s the
 * fd together with an eventfd that cleanup signals.  (The real library does
 * none of this: there, shut the socket down to release a blocked reader and
 * only call cleanup once no other call is in progress.)
 */

#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#if defined(RATS_LAYOUT_2022) && defined(RATS_LAYOUT_2025)
#error "choose one of RATS_LAYOUT_2022 and RATS_LAYOUT_2025"
#endif
#if !defined(RATS_LAYOUT_2022) && !defined(RATS_LAYOUT_2025)
#define RATS_LAYOUT_2025 1
#endif

#ifndef RATS_PLUGIN_DIR
#define RATS_PLUGIN_DIR "/usr/local/lib/rats-tls"
#endif

#define API __attribute__((visibility("default")))

/* ------------------------------------------------------------------ */
/* Public types (api.h / err.h / claim.h of rats-tls)                  */

#define TLS_TYPE_NAME_SIZE 32
#define ENCLAVE_ATTESTER_TYPE_NAME_SIZE 32
#define ENCLAVE_VERIFIER_TYPE_NAME_SIZE 32
#define CRYPTO_TYPE_NAME_SIZE 32
#define ENCLAVE_SGX_SPID_LENGTH 16

#define RATS_TLS_API_VERSION_MAX 1

#define RATS_TLS_CONF_FLAGS_MUTUAL (1UL << 0)
#define RATS_TLS_CONF_FLAGS_SERVER (1UL << 1)
#ifdef RATS_LAYOUT_2025
#define RATS_TLS_CONF_FLAGS_PROVIDE_ENDORSEMENTS (1UL << 2)
#endif

typedef enum {
	RATS_TLS_LOG_LEVEL_DEBUG,
	RATS_TLS_LOG_LEVEL_INFO,
	RATS_TLS_LOG_LEVEL_WARN,
	RATS_TLS_LOG_LEVEL_ERROR,
	RATS_TLS_LOG_LEVEL_FATAL,
	RATS_TLS_LOG_LEVEL_NONE,
	RATS_TLS_LOG_LEVEL_MAX,
	RATS_TLS_LOG_LEVEL_DEFAULT = RATS_TLS_LOG_LEVEL_ERROR
} rats_tls_log_level_t;

typedef enum {
	RATS_TLS_CERT_ALGO_RSA_3072_SHA256,
	RATS_TLS_CERT_ALGO_ECC_256_SHA256,
	RATS_TLS_CERT_ALGO_MAX,
#ifdef RATS_LAYOUT_2022
	RATS_TLS_CERT_ALGO_DEFAULT = RATS_TLS_CERT_ALGO_ECC_256_SHA256
#else
	RATS_TLS_CERT_ALGO_DEFAULT = 3
#endif
} rats_tls_cert_algo_t;

/* An unsigned enum in upstream; errors are returned negated. */
typedef enum {
	RATS_TLS_ERR_NONE = 0,
	RATS_TLS_ERR_UNKNOWN,
	RATS_TLS_ERR_INVALID,
	RATS_TLS_ERR_NO_MEM,
	RATS_TLS_ERR_NOT_REGISTERED,
	RATS_TLS_ERR_LOAD_CRYPTO_WRAPPERS,
	RATS_TLS_ERR_LOAD_TLS_WRAPPERS,
	RATS_TLS_ERR_LOAD_ENCLAVE_QUOTES,
	RATS_TLS_ERR_DLOPEN,
	RATS_TLS_ERR_INIT,
	RATS_TLS_ERR_UNSUPPORTED_CERT_ALGO,
	RATS_TLS_ERR_FORCE_UNSIGNED_ = 0x7fffffff
} rats_tls_err_t;

/* What the openssl tls wrapper returns for any failed handshake. */
#define TLS_WRAPPER_ERR_NEGOTIATE ((rats_tls_err_t)0x907fffffu)

#define E_INVALID ((rats_tls_err_t)(-RATS_TLS_ERR_INVALID))
#define E_NO_MEM ((rats_tls_err_t)(-RATS_TLS_ERR_NO_MEM))

typedef struct claim claim_t;
struct claim {
	char *name;
	uint8_t *value;
	size_t value_size;
} __attribute__((packed));

typedef struct {
	unsigned int api_version;
	unsigned long flags;
	rats_tls_log_level_t log_level;
	char tls_type[TLS_TYPE_NAME_SIZE];
	char attester_type[ENCLAVE_ATTESTER_TYPE_NAME_SIZE];
	char verifier_type[ENCLAVE_VERIFIER_TYPE_NAME_SIZE];
	char crypto_type[CRYPTO_TYPE_NAME_SIZE];
	rats_tls_cert_algo_t cert_algo;
#ifdef RATS_LAYOUT_2022
	unsigned long long enclave_id;
#else
	claim_t *custom_claims;
	size_t custom_claims_length;
#endif
	struct {
		bool valid;
		uint8_t spid[ENCLAVE_SGX_SPID_LENGTH];
		bool linkable;
	} quote_sgx_epid;
	struct {
		bool valid;
		uint8_t cert_type;
	} quote_sgx_ecdsa;
} rats_tls_conf_t;

_Static_assert(sizeof(rats_tls_log_level_t) == 4, "enums are 4 bytes");
_Static_assert(sizeof(rats_tls_cert_algo_t) == 4, "enums are 4 bytes");
_Static_assert(sizeof(rats_tls_err_t) == 4, "enums are 4 bytes");
_Static_assert(offsetof(rats_tls_conf_t, api_version) == 0, "api_version");
_Static_assert(offsetof(rats_tls_conf_t, flags) == 8, "flags");
_Static_assert(offsetof(rats_tls_conf_t, log_level) == 16, "log_level");
_Static_assert(offsetof(rats_tls_conf_t, tls_type) == 20, "tls_type");
_Static_assert(offsetof(rats_tls_conf_t, attester_type) == 52, "attester_type");
_Static_assert(offsetof(rats_tls_conf_t, verifier_type) == 84, "verifier_type");
_Static_assert(offsetof(rats_tls_conf_t, crypto_type) == 116, "crypto_type");
_Static_assert(offsetof(rats_tls_conf_t, cert_algo) == 148, "cert_algo");
_Static_assert(sizeof(((rats_tls_conf_t *)0)->quote_sgx_epid) == 18, "quote_sgx_epid");
#ifdef RATS_LAYOUT_2022
_Static_assert(offsetof(rats_tls_conf_t, enclave_id) == 152, "enclave_id");
_Static_assert(offsetof(rats_tls_conf_t, quote_sgx_epid) == 160, "quote_sgx_epid");
_Static_assert(offsetof(rats_tls_conf_t, quote_sgx_ecdsa) == 178, "quote_sgx_ecdsa");
_Static_assert(sizeof(rats_tls_conf_t) == 184, "v2022 layout is 184 bytes");
#else
_Static_assert(sizeof(claim_t) == 24, "claim_t");
_Static_assert(offsetof(rats_tls_conf_t, custom_claims) == 152, "custom_claims");
_Static_assert(offsetof(rats_tls_conf_t, custom_claims_length) == 160, "custom_claims_length");
_Static_assert(offsetof(rats_tls_conf_t, quote_sgx_epid) == 168, "quote_sgx_epid");
_Static_assert(offsetof(rats_tls_conf_t, quote_sgx_ecdsa) == 186, "quote_sgx_ecdsa");
_Static_assert(sizeof(rats_tls_conf_t) == 192, "v2025 layout is 192 bytes");
#endif

typedef struct rtls_core_context_t *rats_tls_handle;
typedef int (*rats_tls_callback_t)(void *);

/*
 * What the verification callback receives: upstream's rtls_evidence_t, in
 * this build's layout (api.h of each version).  The mock's null evidence
 * is no SGX ECDSA quote, so it passes it zeroed (type 0, no claims), as the
 * real 2025 library does for a nullattester peer.
 */
typedef struct {
	void *public_key;
	int user_data_size;
	char *user_data;
	int unhashed_size;
	char *unhashed;
} ehd_t;

typedef struct {
	uint8_t *mr_enclave;
	uint8_t *mr_signer;
	uint32_t product_id;
	uint32_t security_version;
	uint8_t *attributes;
	size_t collateral_size;
	char *collateral;
} rtls_sgx_evidence_t;

typedef struct {
	uint8_t *mrseam;
	uint8_t *mrseamsigner;
	uint8_t *tcb_svns;
	uint8_t *cpu_svn;
	uint8_t *mrtd;
	uint8_t *rtmr;
	uint8_t *tdel_info;
	uint32_t tdel_info_sz;
	uint8_t *tdel_data;
	uint32_t tdel_data_sz;
} rtls_tdx_evidence_t;

typedef struct {
	int type; /* enclave_evidence_type_t: SGX_ECDSA = 1, TDX_ECDSA, CSV */
#ifdef RATS_LAYOUT_2025
	claim_t *custom_claims;
	size_t custom_claims_length;
#endif
	ehd_t ehd;
	int quote_size;
	char *quote;
	union {
		rtls_sgx_evidence_t sgx;
		rtls_tdx_evidence_t tdx;
	};
} rtls_evidence_t;

/* Private OID of the mock's evidence extension. */
#define MOCK_EVIDENCE_OID "1.3.6.1.4.1.99999.8.1"
#define MOCK_EVIDENCE_PREFIX "null-evidence:"

/* ------------------------------------------------------------------ */
/* Logging                                                             */

static int global_log_level = RATS_TLS_LOG_LEVEL_DEFAULT;

static void mlog(int threshold, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static void mlog(int threshold, int level, const char *fmt, ...)
{
	static const char *names[] = { "DEBUG", "INFO", "WARN", "ERROR", "FATAL" };
	if (threshold < 0 || threshold >= RATS_TLS_LOG_LEVEL_NONE || level < threshold)
		return;
	FILE *out = level >= RATS_TLS_LOG_LEVEL_ERROR ? stderr : stdout;
	va_list ap;
	va_start(ap, fmt);
	flockfile(out);
	fprintf(out, "[%s] rats-tls-mock: ", names[level]);
	vfprintf(out, fmt, ap);
	fputc('\n', out);
	funlockfile(out);
	fflush(out);
	va_end(ap);
}

#define LOG(ctx, level, ...) mlog((ctx) ? (ctx)->log_level : global_log_level, level, __VA_ARGS__)
#define LOG_ERR(ctx, ...) LOG(ctx, RATS_TLS_LOG_LEVEL_ERROR, __VA_ARGS__)
#define LOG_DEBUG(ctx, ...) LOG(ctx, RATS_TLS_LOG_LEVEL_DEBUG, __VA_ARGS__)

/* Exported only by the v2022 library (one of the layout tell-tales). */
#ifdef RATS_LAYOUT_2022
#define LOGLEVEL_GETENV_LINKAGE API
#else
#define LOGLEVEL_GETENV_LINKAGE static
#endif

LOGLEVEL_GETENV_LINKAGE rats_tls_log_level_t rtls_loglevel_getenv(const char *name)
{
	const char *v = name ? getenv(name) : NULL;
	if (!v)
		return RATS_TLS_LOG_LEVEL_DEFAULT;
	if (!strcasecmp(v, "debug"))
		return RATS_TLS_LOG_LEVEL_DEBUG;
	if (!strcasecmp(v, "info"))
		return RATS_TLS_LOG_LEVEL_INFO;
	if (!strcasecmp(v, "warn"))
		return RATS_TLS_LOG_LEVEL_WARN;
	if (!strcasecmp(v, "error"))
		return RATS_TLS_LOG_LEVEL_ERROR;
	if (!strcasecmp(v, "fatal"))
		return RATS_TLS_LOG_LEVEL_FATAL;
	if (!strcasecmp(v, "off"))
		return RATS_TLS_LOG_LEVEL_NONE;
	return RATS_TLS_LOG_LEVEL_DEFAULT;
}

/* ------------------------------------------------------------------ */
/* Load-time constructor: the plugin-directory pitfall                 */

/* Full paths as literals, like upstream's CRYPTO_WRAPPERS_DIR and friends. */
static const char *const plugin_dirs[] = {
	RATS_PLUGIN_DIR "/crypto-wrappers/",
	RATS_PLUGIN_DIR "/tls-wrappers/",
	RATS_PLUGIN_DIR "/attesters/",
	RATS_PLUGIN_DIR "/verifiers/",
};

static int plugin_dir_usable(const char *path)
{
	DIR *d = opendir(path);
	if (!d)
		return 0;
	int found = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
			found = 1;
			break;
		}
	}
	closedir(d);
	return found;
}

__attribute__((constructor)) static void rats_tls_mock_load(void)
{
	global_log_level = rtls_loglevel_getenv("RATS_TLS_GLOBAL_LOG_LEVEL");
	for (size_t i = 0; i < sizeof(plugin_dirs) / sizeof(plugin_dirs[0]); i++) {
		if (!plugin_dir_usable(plugin_dirs[i])) {
			/* Like upstream: a FATAL line, then the whole process goes. */
			fprintf(stderr, "[FATAL] rats-tls-mock: failed to load any plugin from %s\n",
				plugin_dirs[i]);
			fflush(stderr);
			exit(1);
		}
	}
}

/* ------------------------------------------------------------------ */
/* Claims (v2025 only)                                                 */

#ifdef RATS_LAYOUT_2025
API void free_claims_list(claim_t *claims, size_t claims_length)
{
	if (!claims)
		return;
	for (size_t i = 0; i < claims_length; i++) {
		free(claims[i].name);
		free(claims[i].value);
	}
	free(claims);
}

API claim_t *clone_claims_list(claim_t *claims, size_t claims_length)
{
	if (!claims || !claims_length)
		return NULL;
	claim_t *out = calloc(claims_length, sizeof(*out));
	if (!out)
		return NULL;
	for (size_t i = 0; i < claims_length; i++) {
		out[i].name = strdup(claims[i].name ? claims[i].name : "");
		out[i].value = malloc(claims[i].value_size ? claims[i].value_size : 1);
		if (!out[i].name || !out[i].value) {
			free_claims_list(out, i + 1);
			return NULL;
		}
		if (claims[i].value_size)
			memcpy(out[i].value, claims[i].value, claims[i].value_size);
		out[i].value_size = claims[i].value_size;
	}
	return out;
}
#endif

/* ------------------------------------------------------------------ */
/* The handle                                                          */

struct rtls_core_context_t {
	rats_tls_conf_t config;
	int log_level;
	int server, mutual;
	char attester[ENCLAVE_ATTESTER_TYPE_NAME_SIZE + 1];
	rats_tls_callback_t verify_cb;

	EVP_PKEY *pkey;
	X509 *cert;
	SSL_CTX *ssl_ctx;
	SSL *ssl;
	int fd;
	int wake_fd; /* eventfd, written once by cleanup to release waiters */

	/*
	 * read_lock serialises receive calls, write_lock transmit calls;
	 * negotiate and cleanup take both.  lock guards the SSL object and the
	 * flags below; it is never held while waiting for the socket.
	 * Order: read_lock, write_lock, lock.
	 */
	pthread_mutex_t read_lock, write_lock, lock;
	int negotiated;
	int closing;     /* cleanup has started */
	int read_closed; /* the peer's close_notify or EOF was seen */
	int broken;      /* a fatal TLS or socket error: no more SSL calls */
};

static int mock_ex_index = -1;
static pthread_once_t mock_once = PTHREAD_ONCE_INIT;
static BIO_METHOD *mock_bio_method;

/* ------------------------------------------------------------------ */
/* A socket BIO that never blocks and never touches the fd's flags     */

static int mock_bio_write(BIO *b, const char *buf, int len)
{
	int fd = BIO_get_fd(b, NULL);
	BIO_clear_retry_flags(b);
	for (;;) {
		ssize_t n = send(fd, buf, (size_t)len, MSG_DONTWAIT | MSG_NOSIGNAL);
		if (n >= 0)
			return (int)n;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			BIO_set_retry_write(b);
		return -1;
	}
}

static int mock_bio_read(BIO *b, char *buf, int len)
{
	int fd = BIO_get_fd(b, NULL);
	BIO_clear_retry_flags(b);
	for (;;) {
		ssize_t n = recv(fd, buf, (size_t)len, MSG_DONTWAIT);
		if (n >= 0)
			return (int)n; /* 0 is EOF */
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN || errno == EWOULDBLOCK)
			BIO_set_retry_read(b);
		return -1;
	}
}

static int mock_bio_puts(BIO *b, const char *str)
{
	return mock_bio_write(b, str, (int)strlen(str));
}

static long mock_bio_ctrl(BIO *b, int cmd, long num, void *ptr)
{
	switch (cmd) {
	case BIO_C_SET_FD:
		BIO_set_data(b, (void *)(intptr_t)*(int *)ptr);
		BIO_set_shutdown(b, (int)num);
		BIO_set_init(b, 1);
		return 1;
	case BIO_C_GET_FD:
		if (!BIO_get_init(b))
			return -1;
		if (ptr)
			*(int *)ptr = (int)(intptr_t)BIO_get_data(b);
		return (long)(intptr_t)BIO_get_data(b);
	case BIO_CTRL_FLUSH:
		return 1;
	default:
		return 0;
	}
}

static int mock_bio_create(BIO *b)
{
	BIO_set_data(b, (void *)(intptr_t)-1);
	BIO_set_init(b, 0);
	return 1;
}

static int mock_bio_destroy(BIO *b)
{
	(void)b; /* never closes the fd: cleanup must leave it open */
	return 1;
}

static void mock_global_init(void)
{
	mock_ex_index = SSL_get_ex_new_index(0, "rats-tls-mock ctx", NULL, NULL, NULL);
	BIO_METHOD *m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK |
					     BIO_TYPE_DESCRIPTOR,
				     "rats-tls-mock socket");
	if (!m)
		return;
	BIO_meth_set_write(m, mock_bio_write);
	BIO_meth_set_read(m, mock_bio_read);
	BIO_meth_set_puts(m, mock_bio_puts);
	BIO_meth_set_ctrl(m, mock_bio_ctrl);
	BIO_meth_set_create(m, mock_bio_create);
	BIO_meth_set_destroy(m, mock_bio_destroy);
	mock_bio_method = m;
}

/* ------------------------------------------------------------------ */
/* Certificate with "null evidence"                                    */

static int pubkey_hash(EVP_PKEY *pkey, unsigned char out[SHA256_DIGEST_LENGTH])
{
	unsigned char *der = NULL;
	int len = i2d_PUBKEY(pkey, &der);
	if (len <= 0)
		return 0;
	SHA256(der, (size_t)len, out);
	OPENSSL_free(der);
	return 1;
}

static void hex(const unsigned char *in, size_t n, char *out)
{
	static const char digits[] = "0123456789abcdef";
	for (size_t i = 0; i < n; i++) {
		out[2 * i] = digits[in[i] >> 4];
		out[2 * i + 1] = digits[in[i] & 15];
	}
	out[2 * n] = '\0';
}

/* "null-evidence:<attester>:<sha256 of the DER public key, hex>" */
static int make_evidence(struct rtls_core_context_t *ctx, char *out, size_t outsize)
{
	unsigned char h[SHA256_DIGEST_LENGTH];
	char hx[2 * SHA256_DIGEST_LENGTH + 1];
	if (!pubkey_hash(ctx->pkey, h))
		return 0;
	hex(h, sizeof(h), hx);
	int n = snprintf(out, outsize, MOCK_EVIDENCE_PREFIX "%s:%s", ctx->attester, hx);
	return n > 0 && (size_t)n < outsize ? n : 0;
}

static int generate_certificate(struct rtls_core_context_t *ctx)
{
	int ok = 0;
	X509 *x = NULL;
	X509_NAME *name;
	ASN1_OBJECT *oid = NULL;
	ASN1_OCTET_STRING *octets = NULL;
	X509_EXTENSION *ext = NULL;
	char evidence[256];
	int evidence_len;

	ctx->pkey = EVP_EC_gen("P-256");
	if (!ctx->pkey)
		goto out;
	x = X509_new();
	if (!x || !X509_set_version(x, 2))
		goto out;
	ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
	X509_gmtime_adj(X509_getm_notBefore(x), -3600);
	X509_gmtime_adj(X509_getm_notAfter(x), 365L * 24 * 3600);
	if (!X509_set_pubkey(x, ctx->pkey))
		goto out;
	name = X509_get_subject_name(x);
	X509_NAME_add_entry_by_txt(name, "O", MBSTRING_ASC,
				   (const unsigned char *)"Inclavare Containers", -1, -1, 0);
	X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC,
				   (const unsigned char *)"RATS-TLS", -1, -1, 0);
	X509_set_issuer_name(x, name);

	evidence_len = make_evidence(ctx, evidence, sizeof(evidence));
	oid = OBJ_txt2obj(MOCK_EVIDENCE_OID, 1);
	octets = ASN1_OCTET_STRING_new();
	if (!evidence_len || !oid || !octets ||
	    !ASN1_OCTET_STRING_set(octets, (unsigned char *)evidence, evidence_len))
		goto out;
	ext = X509_EXTENSION_create_by_OBJ(NULL, oid, 0, octets);
	if (!ext || !X509_add_ext(x, ext, -1))
		goto out;
	if (!X509_sign(x, ctx->pkey, EVP_sha256()))
		goto out;
	ctx->cert = x;
	x = NULL;
	ok = 1;
out:
	X509_EXTENSION_free(ext);
	ASN1_OCTET_STRING_free(octets);
	ASN1_OBJECT_free(oid);
	X509_free(x);
	return ok;
}

/* The nullverifier: any certificate carrying evidence bound to its key. */
static int verify_peer_certificate(X509_STORE_CTX *store, void *arg)
{
	(void)arg;
	SSL *ssl = X509_STORE_CTX_get_ex_data(store, SSL_get_ex_data_X509_STORE_CTX_idx());
	struct rtls_core_context_t *ctx = ssl ? SSL_get_ex_data(ssl, mock_ex_index) : NULL;
	X509 *cert = X509_STORE_CTX_get0_cert(store);
	ASN1_OBJECT *oid = OBJ_txt2obj(MOCK_EVIDENCE_OID, 1);
	int result = 0;

	if (!ctx || !cert || !oid)
		goto out;
	EVP_PKEY *pub = X509_get0_pubkey(cert);
	if (!pub || X509_verify(cert, pub) != 1) {
		LOG_ERR(ctx, "peer certificate is not validly self-signed");
		goto out;
	}
	int idx = X509_get_ext_by_OBJ(cert, oid, -1);
	if (idx < 0) {
		LOG_ERR(ctx, "peer certificate carries no evidence: rejected");
		goto out;
	}
	ASN1_OCTET_STRING *data = X509_EXTENSION_get_data(X509_get_ext(cert, idx));
	const unsigned char *blob = ASN1_STRING_get0_data(data);
	size_t size = (size_t)ASN1_STRING_length(data);
	size_t plen = strlen(MOCK_EVIDENCE_PREFIX);
	if (size < plen + 1 + 2 * SHA256_DIGEST_LENGTH || memcmp(blob, MOCK_EVIDENCE_PREFIX, plen)) {
		LOG_ERR(ctx, "peer evidence is malformed: rejected");
		goto out;
	}
	/* The evidence must be bound to this certificate's key. */
	unsigned char h[SHA256_DIGEST_LENGTH];
	char hx[2 * SHA256_DIGEST_LENGTH + 1];
	if (!pubkey_hash(pub, h))
		goto out;
	hex(h, sizeof(h), hx);
	if (memcmp(blob + size - 2 * SHA256_DIGEST_LENGTH, hx, 2 * SHA256_DIGEST_LENGTH) ||
	    blob[size - 2 * SHA256_DIGEST_LENGTH - 1] != ':') {
		LOG_ERR(ctx, "peer evidence does not match its public key: rejected");
		goto out;
	}

	char type[32];
	size_t tlen = size - plen - 2 * SHA256_DIGEST_LENGTH - 1;
	if (tlen >= sizeof(type))
		tlen = sizeof(type) - 1;
	memcpy(type, blob + plen, tlen);
	type[tlen] = '\0';
	LOG_DEBUG(ctx, "peer evidence from attester '%s' accepted by the nullverifier", type);

	rtls_evidence_t ev;
	memset(&ev, 0, sizeof(ev));

	if (ctx->verify_cb && ctx->verify_cb(&ev) == 0) {
		LOG_ERR(ctx, "the verification callback rejected the peer's evidence");
		goto out;
	}
	result = 1;
out:
	ASN1_OBJECT_free(oid);
	if (!result)
		X509_STORE_CTX_set_error(store, X509_V_ERR_APPLICATION_VERIFICATION);
	return result;
}

/* ------------------------------------------------------------------ */
/* API                                                                 */

static int name_ok(const char *field, size_t size, const char *const *allowed)
{
	if (memchr(field, '\0', size) == NULL)
		return 0;
	if (field[0] == '\0')
		return 1; /* empty: the default plugin */
	for (; *allowed; allowed++)
		if (!strcmp(field, *allowed))
			return 1;
	return 0;
}

static void free_ctx(struct rtls_core_context_t *ctx)
{
	if (ctx->ssl)
		SSL_free(ctx->ssl);
	SSL_CTX_free(ctx->ssl_ctx);
	X509_free(ctx->cert);
	EVP_PKEY_free(ctx->pkey);
	if (ctx->wake_fd >= 0)
		close(ctx->wake_fd);
#ifdef RATS_LAYOUT_2025
	free_claims_list(ctx->config.custom_claims, ctx->config.custom_claims_length);
#endif
	pthread_mutex_destroy(&ctx->lock);
	pthread_mutex_destroy(&ctx->read_lock);
	pthread_mutex_destroy(&ctx->write_lock);
	free(ctx);
}

API rats_tls_err_t rats_tls_init(const rats_tls_conf_t *conf, rats_tls_handle *handle)
{
	static const char *const tls_names[] = { "openssl", NULL };
	static const char *const crypto_names[] = { "openssl", NULL };
	static const char *const attester_names[] = { "nullattester", NULL };
	static const char *const verifier_names[] = { "nullverifier", NULL };

	if (!conf || !handle)
		return E_INVALID;
	pthread_once(&mock_once, mock_global_init);
	if (mock_ex_index < 0 || !mock_bio_method)
		return E_NO_MEM;

	struct rtls_core_context_t *ctx = calloc(1, sizeof(*ctx));
	if (!ctx)
		return E_NO_MEM;
	ctx->config = *conf;
	ctx->fd = -1;
	ctx->wake_fd = -1;
	pthread_mutex_init(&ctx->lock, NULL);
	pthread_mutex_init(&ctx->read_lock, NULL);
	pthread_mutex_init(&ctx->write_lock, NULL);
#ifdef RATS_LAYOUT_2025
	ctx->config.custom_claims = NULL;
	ctx->config.custom_claims_length = 0;
#endif
	ctx->log_level = (int)conf->log_level;
	if (ctx->log_level < 0 || ctx->log_level >= RATS_TLS_LOG_LEVEL_MAX)
		ctx->log_level = global_log_level;

	rats_tls_err_t err = E_INVALID;
	if (conf->api_version > RATS_TLS_API_VERSION_MAX) {
		LOG_ERR(ctx, "unsupported rats-tls api version %u", conf->api_version);
		goto fail;
	}
	if (!name_ok(conf->tls_type, sizeof(conf->tls_type), tls_names) ||
	    !name_ok(conf->crypto_type, sizeof(conf->crypto_type), crypto_names)) {
		LOG_ERR(ctx, "unknown tls or crypto wrapper");
		goto fail;
	}
	if (!name_ok(conf->attester_type, sizeof(conf->attester_type), attester_names)) {
		LOG_ERR(ctx, "failed to select the enclave attester '%.32s'", conf->attester_type);
		goto fail;
	}
	if (!name_ok(conf->verifier_type, sizeof(conf->verifier_type), verifier_names)) {
		LOG_ERR(ctx, "failed to select the enclave verifier '%.32s'", conf->verifier_type);
		goto fail;
	}
	snprintf(ctx->attester, sizeof(ctx->attester), "%s",
		 conf->attester_type[0] ? conf->attester_type : "nullattester");

	unsigned int algo = (unsigned int)conf->cert_algo;
	if (algo == (unsigned int)RATS_TLS_CERT_ALGO_DEFAULT || algo >= RATS_TLS_CERT_ALGO_MAX)
		algo = RATS_TLS_CERT_ALGO_ECC_256_SHA256;
	if (algo != RATS_TLS_CERT_ALGO_ECC_256_SHA256) {
		LOG_ERR(ctx, "the mock supports only ECC_256_SHA256 certificates");
		err = (rats_tls_err_t)(-RATS_TLS_ERR_UNSUPPORTED_CERT_ALGO);
		goto fail;
	}

#ifdef RATS_LAYOUT_2025
	if (conf->custom_claims && conf->custom_claims_length) {
		ctx->config.custom_claims =
			clone_claims_list(conf->custom_claims, conf->custom_claims_length);
		if (!ctx->config.custom_claims) {
			err = E_NO_MEM;
			goto fail;
		}
		ctx->config.custom_claims_length = conf->custom_claims_length;
	}
#endif

	ctx->server = !!(conf->flags & RATS_TLS_CONF_FLAGS_SERVER);
	ctx->mutual = !!(conf->flags & RATS_TLS_CONF_FLAGS_MUTUAL);

	err = (rats_tls_err_t)(-RATS_TLS_ERR_INIT);
	ctx->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (ctx->wake_fd < 0)
		goto fail;
	if ((ctx->server || ctx->mutual) && !generate_certificate(ctx)) {
		LOG_ERR(ctx, "failed to generate the certificate");
		goto fail;
	}
	ctx->ssl_ctx = SSL_CTX_new(ctx->server ? TLS_server_method() : TLS_client_method());
	if (!ctx->ssl_ctx)
		goto fail;
	SSL_CTX_set_min_proto_version(ctx->ssl_ctx, TLS1_3_VERSION);
	/* Upstream sets no modes: a retried write must pass the same buffer. */
	SSL_CTX_clear_mode(ctx->ssl_ctx, SSL_MODE_AUTO_RETRY);
	SSL_CTX_set_num_tickets(ctx->ssl_ctx, 0);
	if (ctx->cert && (SSL_CTX_use_certificate(ctx->ssl_ctx, ctx->cert) != 1 ||
			  SSL_CTX_use_PrivateKey(ctx->ssl_ctx, ctx->pkey) != 1))
		goto fail;
	int mode = SSL_VERIFY_PEER;
	if (ctx->server)
		mode = ctx->mutual ? SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT
				   : SSL_VERIFY_NONE;
	SSL_CTX_set_verify(ctx->ssl_ctx, mode, NULL);
	SSL_CTX_set_cert_verify_callback(ctx->ssl_ctx, verify_peer_certificate, NULL);

	LOG_DEBUG(ctx, "handle %p created (%s%s)", (void *)ctx, ctx->server ? "server" : "client",
		  ctx->mutual ? ", mutual" : "");
	*handle = ctx;
	return RATS_TLS_ERR_NONE;
fail:
	free_ctx(ctx);
	return err;
}

API rats_tls_err_t rats_tls_set_verification_callback(rats_tls_handle *handle,
						      rats_tls_callback_t cb)
{
	if (!handle || !*handle)
		return E_INVALID;
	pthread_mutex_lock(&(*handle)->lock);
	(*handle)->verify_cb = cb;
	pthread_mutex_unlock(&(*handle)->lock);
	return RATS_TLS_ERR_NONE;
}

/* Wait, without the lock, until the socket is ready or cleanup begins. */
static void wait_socket(struct rtls_core_context_t *ctx, int ssl_error)
{
	struct pollfd p[2] = {
		{ .fd = ctx->fd, .events = ssl_error == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN },
		{ .fd = ctx->wake_fd, .events = POLLIN },
	};
	pthread_mutex_unlock(&ctx->lock);
	while (poll(p, 2, -1) < 0 && errno == EINTR)
		;
	pthread_mutex_lock(&ctx->lock);
}

/*
 * Like upstream's openssl wrapper on a non-blocking fd: a receive or
 * transmit that would have to wait fails with -RATS_TLS_ERR_INVALID at once,
 * errno EAGAIN, and the session stays usable (a transmit must then be
 * retried with the same buffer and length, as OpenSSL wants).
 */
static int fd_nonblocking(int fd)
{
	int flags = fcntl(fd, F_GETFL);
	return flags >= 0 && (flags & O_NONBLOCK);
}

static void log_ssl_errors(struct rtls_core_context_t *ctx, const char *what, int ssl_error)
{
	unsigned long e;
	int any = 0;
	while ((e = ERR_get_error()) != 0) {
		char buf[256];
		ERR_error_string_n(e, buf, sizeof(buf));
		LOG_ERR(ctx, "%s: %s", what, buf);
		any = 1;
	}
	if (!any)
		LOG_ERR(ctx, "%s: ssl error %d, errno %d", what, ssl_error, errno);
}

API rats_tls_err_t rats_tls_negotiate(rats_tls_handle ctx, int fd)
{
	if (!ctx || fd < 0)
		return E_INVALID;
	int flags = fcntl(fd, F_GETFL);
	if (flags < 0) {
		LOG_ERR(ctx, "negotiate: fd %d is not open", fd);
		return TLS_WRAPPER_ERR_NEGOTIATE;
	}
	if (flags & O_NONBLOCK) {
		/* The real openssl wrapper fails at once on a non-blocking fd. */
		LOG_ERR(ctx, "negotiate: fd %d is non-blocking", fd);
		return TLS_WRAPPER_ERR_NEGOTIATE;
	}

	rats_tls_err_t err = TLS_WRAPPER_ERR_NEGOTIATE;
	pthread_mutex_lock(&ctx->read_lock);
	pthread_mutex_lock(&ctx->write_lock);
	pthread_mutex_lock(&ctx->lock);
	if (ctx->ssl || ctx->closing) {
		err = E_INVALID;
		goto out;
	}
	ctx->ssl = SSL_new(ctx->ssl_ctx);
	BIO *bio = ctx->ssl ? BIO_new(mock_bio_method) : NULL;
	if (!bio) {
		err = E_NO_MEM;
		goto out;
	}
	BIO_set_fd(bio, fd, BIO_NOCLOSE);
	SSL_set_bio(ctx->ssl, bio, bio);
	SSL_set_ex_data(ctx->ssl, mock_ex_index, ctx);
	ctx->fd = fd;
	if (ctx->server)
		SSL_set_accept_state(ctx->ssl);
	else
		SSL_set_connect_state(ctx->ssl);

	for (;;) {
		if (ctx->closing) {
			LOG_ERR(ctx, "negotiate: cleanup was called");
			break;
		}
		ERR_clear_error();
		errno = 0;
		int r = SSL_do_handshake(ctx->ssl);
		if (r == 1) {
			ctx->negotiated = 1;
			err = RATS_TLS_ERR_NONE;
			LOG_DEBUG(ctx, "handshake done on fd %d (%s)", fd, SSL_get_version(ctx->ssl));
			break;
		}
		int e = SSL_get_error(ctx->ssl, r);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
			wait_socket(ctx, e);
			continue;
		}
		log_ssl_errors(ctx, "negotiate: handshake failed", e);
		ctx->broken = 1;
		break;
	}
out:
	pthread_mutex_unlock(&ctx->lock);
	pthread_mutex_unlock(&ctx->write_lock);
	pthread_mutex_unlock(&ctx->read_lock);
	return err;
}

API rats_tls_err_t rats_tls_receive(rats_tls_handle ctx, void *buf, size_t *buf_size)
{
	if (!ctx || !buf || !buf_size)
		return E_INVALID;
	int cap = *buf_size > INT_MAX ? INT_MAX : (int)*buf_size;
	if (cap <= 0)
		return E_INVALID;

	rats_tls_err_t err = E_INVALID;
	int again = 0;
	pthread_mutex_lock(&ctx->read_lock);
	pthread_mutex_lock(&ctx->lock);
	while (ctx->negotiated && !ctx->closing && !ctx->broken && !ctx->read_closed) {
		ERR_clear_error();
		errno = 0;
		int n = SSL_read(ctx->ssl, buf, cap);
		if (n > 0) {
			*buf_size = (size_t)n;
			err = RATS_TLS_ERR_NONE;
			break;
		}
		int e = SSL_get_error(ctx->ssl, n);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
			if (fd_nonblocking(ctx->fd)) {
				again = 1;
				break;
			}
			wait_socket(ctx, e);
			continue;
		}
		if (e == SSL_ERROR_ZERO_RETURN) {
			LOG_DEBUG(ctx, "receive: the peer sent close_notify");
			ctx->read_closed = 1;
		} else {
			LOG_DEBUG(ctx, "receive: connection lost (ssl error %d)", e);
			ERR_clear_error();
			ctx->broken = 1;
		}
		break;
	}
	pthread_mutex_unlock(&ctx->lock);
	pthread_mutex_unlock(&ctx->read_lock);
	if (again)
		errno = EAGAIN;
	return err;
}

API rats_tls_err_t rats_tls_transmit(rats_tls_handle ctx, void *buf, size_t *buf_size)
{
	if (!ctx || !buf || !buf_size)
		return E_INVALID;
	size_t total = *buf_size, done = 0;

	rats_tls_err_t err = E_INVALID;
	int again = 0;
	pthread_mutex_lock(&ctx->write_lock);
	pthread_mutex_lock(&ctx->lock);
	while (ctx->negotiated && !ctx->closing && !ctx->broken) {
		if (done == total) {
			err = RATS_TLS_ERR_NONE;
			break;
		}
		/* A retried SSL_write must repeat the same length: keep chunks fixed. */
		int chunk = total - done > (1 << 30) ? (1 << 30) : (int)(total - done);
		ERR_clear_error();
		errno = 0;
		int n = SSL_write(ctx->ssl, (const char *)buf + done, chunk);
		if (n > 0) {
			done += (size_t)n;
			continue;
		}
		int e = SSL_get_error(ctx->ssl, n);
		if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
			if (fd_nonblocking(ctx->fd)) {
				again = 1;
				break;
			}
			wait_socket(ctx, e);
			continue;
		}
		LOG_DEBUG(ctx, "transmit: connection lost (ssl error %d)", e);
		ERR_clear_error();
		ctx->broken = 1;
		break;
	}
	if (err == RATS_TLS_ERR_NONE)
		*buf_size = done;
	pthread_mutex_unlock(&ctx->lock);
	pthread_mutex_unlock(&ctx->write_lock);
	if (again)
		errno = EAGAIN;
	return err;
}

API rats_tls_err_t rats_tls_cleanup(rats_tls_handle ctx)
{
	if (!ctx)
		return E_INVALID;

	/* Release any thread waiting in negotiate, receive or transmit. */
	pthread_mutex_lock(&ctx->lock);
	ctx->closing = 1;
	uint64_t one = 1;
	if (write(ctx->wake_fd, &one, sizeof(one)) < 0)
		LOG_ERR(ctx, "cleanup: cannot wake waiters (errno %d)", errno);
	pthread_mutex_unlock(&ctx->lock);

	pthread_mutex_lock(&ctx->read_lock);
	pthread_mutex_lock(&ctx->write_lock);
	pthread_mutex_lock(&ctx->lock);
	if (ctx->ssl && ctx->negotiated && !ctx->broken) {
		/* Send close_notify; wait a little if the socket is full. */
		for (int tries = 0; tries < 10; tries++) {
			ERR_clear_error();
			int r = SSL_shutdown(ctx->ssl);
			if (r >= 0)
				break;
			int e = SSL_get_error(ctx->ssl, r);
			if (e != SSL_ERROR_WANT_WRITE)
				break;
			struct pollfd p = { .fd = ctx->fd, .events = POLLOUT };
			if (poll(&p, 1, 100) < 0 && errno != EINTR)
				break;
		}
		ERR_clear_error();
	}
	pthread_mutex_unlock(&ctx->lock);
	pthread_mutex_unlock(&ctx->write_lock);
	pthread_mutex_unlock(&ctx->read_lock);
	LOG_DEBUG(ctx, "handle %p freed", (void *)ctx);
	free_ctx(ctx);
	return RATS_TLS_ERR_NONE;
}
