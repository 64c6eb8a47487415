/* server.h - moetierd's service: the control socket and the data-plane rings.
 *
 * Threads (decided for a 2-vCPU host; see moetierd(8)):
 *   - the caller's thread runs server_run(): one epoll loop for the listening
 *     socket, every client socket (HELLO, admin requests, SUBMIT over the
 *     socket), signals (signalfd) and a 1 s timer (systemd watchdog, STATUS=);
 *   - one ring thread serves every client's submission ring: it busy-polls
 *     for ring_spin_us after its last work, yielding the CPU while it does,
 *     then sleeps in futex_waitv on all the rings' tail words plus its own
 *     control word (bumped when clients come or go, loads finish, or the
 *     server stops). It never blocks on I/O: acquires are NOWAIT towards the
 *     cache; an ACQUIRE without the NOWAIT flag is parked and retried when a
 *     load finishes (cache on_ready) until wait-timeout-ms.
 * A client's socket hanging up marks it closing; the ring thread then drops
 * all its leases (cache_release_client) and unmaps its ring.
 *
 * Access: peers are identified by SO_PEERCRED uid/gid and SO_PEERGROUPS,
 * never by pid. Data plane: uid 0, the daemon's uid, or a member of the
 * socket group. Admin: uid 0, the daemon's uid, or a member of admin-group.
 */
#ifndef MOETIER_SERVER_H
#define MOETIER_SERVER_H

#include <stdbool.h>
#include <signal.h>
#include <stdint.h>
#include <sys/types.h>

#include "options.h"
#include "util.h"

struct server;
struct cache;

/* Server-level counters, declared once. X(id, help) */
#define SERVER_COUNTERS(X) \
	X(clients_accepted, "clients that completed HELLO") \
	X(clients_refused, "connections refused (credentials, version, limits)") \
	X(clients_closed, "clients that went away") \
	X(leases_reclaimed, "leases dropped because their client went away") \
	X(ring_entries, "ring entries served") \
	X(socket_entries, "entries served over the socket (SUBMIT)") \
	X(bad_entries, "entries that failed validation") \
	X(bad_messages, "control messages that failed validation") \
	X(admin_requests, "admin requests served") \
	X(parked_acquires, "blocking acquires parked until a load finished") \
	X(ring_sleeps, "times the ring thread slept on the futex") \
	X(hello_timeouts, "connections closed for not sending HELLO within hello-timeout-ms") \
	X(share_refusals, "experts answered -EDQUOT: the client held its client-share of the tier")

enum server_counter {
#define X(id, help) SERVER_##id,
	SERVER_COUNTERS(X)
#undef X
	SERVER__COUNT
};

/* Opens every pack of cfg->pack, creates one cache per pack (arena sizes
 * etc. from cfg), the shared state of each model, and binds the socket
 * (refusing a socket directory writable by others). cfg is kept (not
 * copied): runtime options changed by `moectl config set` land in it. */
int server_create(struct moetierd_config *cfg, struct server **out, struct moe_error *err);
/* Number of models and the cache of model i (tests, benchmarks). */
unsigned server_n_models(const struct server *s);
struct cache *server_model_cache(struct server *s, unsigned i);
/* Starts the ring thread. */
int server_start(struct server *s, struct moe_error *err);
/* Runs the event loop until SIGTERM/SIGINT (or server_stop). Sends
 * READY=1 once listening, STATUS= and WATCHDOG=1 when systemd asks. */
int server_run(struct server *s, struct moe_error *err);
/* Blocks, in the calling thread, the signals server_run reads from its
 * signalfd (SIGTERM, SIGINT, SIGHUP) and sets *mask (may be NULL) to them.
 * Call it before any thread exists, so every thread inherits the mask. */
void server_block_signals(sigset_t *mask);
/* Asks server_run to return (async-signal-safe). */
void server_stop(struct server *s);
/* Closes every client, stops the ring thread, unlinks the socket. */
void server_destroy(struct server *s);

/* For tests and benchmarks: pin the ring thread to a CPU (-1: any). */
int server_pin_ring_thread(struct server *s, int cpu);
uint64_t server_counter(const struct server *s, enum server_counter id);

/* The socket directory check: -EPERM with a message when dir is writable by
 * group-other users it should not be (mode & 0002), or not a directory. */
int server_check_socket_dir(const char *socket_path, struct moe_error *err);

#endif
