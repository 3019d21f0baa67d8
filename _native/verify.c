/* The certificate verify callback handed to OpenSSL (SPEC §3.3, "No Python callbacks inside
 * OpenSSL"). A Python verify callback is a cffi ffi.callback, which needs write+execute memory
 * (refused under systemd's MemoryDenyWriteExecute=yes or PR_SET_MDWE) and costs a Python call
 * per certificate of every handshake. This one is plain C: it accepts every chain, so
 * verification never fails a handshake; the gateway reads SSL_get_verify_result afterwards
 * and answers with a reply instead of a TLS alert (gateway/tls/context.py, stream.py).
 * It needs no OpenSSL header: the store context is only passed through, and
 * gateway/tls/_ossl.py casts the address to OpenSSL's `int (*)(int, X509_STORE_CTX *)`. */
#include "gateway_native.h"

int gw_verify_accept(int preverify_ok, void *x509_store_ctx)
{
    (void)preverify_ok;
    (void)x509_store_ctx;
    return 1;
}
