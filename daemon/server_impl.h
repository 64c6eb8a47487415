/* server_impl.h - private to server*.c: the server, its clients and its
 * models, and the functions the server files call in one another. */
#ifndef MOETIER_SERVER_IMPL_H
#define MOETIER_SERVER_IMPL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include "bpf.h"
#include "cache.h"
#include "placement.h"
#include "ring.h"
#include "route.h"
#include "server.h"

enum srv_client_state { CL_ACTIVE = 0, CL_CLOSING = 1, CL_DEAD = 2 };

/* A lease as a client sees it (the id in a CQE, released by RELEASE): the
 * cache leases of one ACQUIRE or ROUTE entry. */
struct srv_lease {
	uint32_t gen;
	uint16_t n;
	bool used;
	struct cache_lease l[MOET_MAX_BATCH];
};

/* A blocking ACQUIRE waiting on the ring thread for its loads. */
struct srv_parked {
	struct moet_sqe sqe;
	struct moet_cqe cqe;     /* filled so far */
	uint32_t lease_idx;      /* lease record (may hold some already) */
	uint64_t park_ns;        /* when it was parked (acquire_wait_ns) */
	uint64_t deadline_ns;
};

/* A model the daemon serves: its pack, cache and shared region. */
struct served_model {
	char name[64];
	struct pack_file *pack;
	struct cache *cache;
	struct server *srv;
	uint32_t n_layers, n_experts, words;
	struct route_params rp;
	float *score_bias;
	/* shared state region */
	int shared_fd;
	uint8_t *shared;
	uint64_t shared_bytes;
	struct moet_shared_hdr *hdr;
	_Atomic uint64_t *dirty;  /* [n_layers/64+1] layers with a finished load */
	uint64_t last_refresh_ns;
	/* One writer at a time for the shared bitmaps' seqlock: the ring
	 * thread, and the control thread before it answers PIN/UNPIN/EVICT
	 * (so a client that got OK already reads the new residency). */
	pthread_mutex_t refresh_lock;
	bool refresh_lock_ok;
	struct compute_ctx *compute; /* NULL when the kernels do not take this model */
	/* MoLAE latent pack: where its B matrices are besides the host copy
	 * COMPUTE uses (moet_latent_basis, stats). In the GPU tier they are one
	 * image after the last expert slot: layer l's block of n_groups[l] x
	 * [B_gate; B_up] (f32 r x n each, struct latent_basis order) at
	 * gpu_offset + layer_off[l]. */
	struct served_latent {
		bool on_gpu;
		uint64_t bytes;        /* the image: what a GPU copy holds */
		uint64_t gpu_offset;   /* from GPU slot 0 (the exported region) */
		uint64_t gpu_reserved; /* arena bytes it takes (rounded) */
		uint64_t *layer_off;   /* [n_layers] */
		char why[200];         /* with a GPU tier, why B stayed on the host */
	} latent;
	struct cache_arena_info arena[2];
	int arena_ro_fd[2];       /* read-only fds handed to clients */
	int shared_ro_fd;
	/* placement: each client stream gets its own predictor (placement.h) */
	struct placement_config plc;
	struct predict_model *pmodel; /* --predictor-model, shared read-only */
	uint32_t top_k;
};

/* A connection: its credentials, its ring and its leases. */
struct srv_client {
	uint32_t id;              /* connection number (moectl clients) */
	uint32_t cache_id;        /* client id towards the cache */
	unsigned idx;             /* slot in srv->clients */
	int fd;
	uid_t uid;
	gid_t gid;
	pid_t pid;                /* shown only; never used for access decisions */
	bool admin, data, hello_done;
	uint64_t accept_ns;       /* HELLO is due by accept_ns + hello-timeout-ms */
	char name[32];
	struct served_model *m;
	uint16_t version;
	_Atomic int state;
	/* Set once HELLO set up the rings, leases and model (release): only
	 * then may the ring thread serve the client. The region pointer alone
	 * is not enough, it is published before the rings are attached. */
	_Atomic bool ring_ready;
	/* data plane */
	int ring_fd;
	uint8_t *region;
	uint64_t region_bytes;
	struct moet_ring_region reg;
	struct ring sq, cq;
	pthread_mutex_t lock;     /* lease table (ring thread vs socket SUBMIT) */
	struct srv_lease *leases;
	uint32_t n_leases_max, n_leases_used;
	uint32_t held[2];         /* cache leases held per tier (0 GPU, 1 host) [lock] */
	struct srv_parked *parked;    /* ring thread only */
	uint32_t n_parked, max_parked;
	struct placement *pl;     /* this stream's predictor + prefetch [lock] */
	bool pl_failed;           /* creating it failed once: do not retry */
	_Atomic uint64_t ops;
};

struct server {
	struct moetierd_config *cfg;
	struct served_model *models;
	unsigned n_models;
	int listen_fd, epfd, sig_fd, timer_fd, reap_fd;
	gid_t sock_gid, admin_gid;
	bool have_sock_gid, have_admin_gid;
	char *sock_path;
	pthread_mutex_t lock;     /* clients[] membership */
	struct srv_client **clients;
	unsigned max_clients;
	uint32_t next_id;
	uint32_t ctl_word;        /* ring thread's private futex word */
	_Atomic bool stop_ring, stop_loop;
	pthread_t ring_thread;
	bool ring_started;
	_Atomic int ring_cpu;
	_Atomic uint64_t counters[SERVER__COUNT];
	uint64_t watchdog_usec;
	uint64_t start_ns;
	struct bpf_obs *bpf;      /* what the kernel sees (never NULL once created) */
};

static inline void server_cnt(struct server *s, enum server_counter c)
{
	atomic_fetch_add_explicit(&s->counters[c], 1, memory_order_relaxed);
}

/* server.c */
/* Wakes the ring thread (clients came or went, a load finished, stop). */
void server_kick_ring(struct server *s);

/* server_model.c: the served models. */
int server_model_open(struct server *s, struct served_model *m, const char *path, unsigned idx, struct moe_error *err);
void server_model_close(struct served_model *m);
/* Copies the residency bitmaps of the layers with a finished load (all:
 * every layer) into the shared region. Ring thread. */
void server_model_refresh(struct served_model *m, bool all);
struct moet_expert_counters *server_model_expert_ctr(struct served_model *m, uint32_t l, uint32_t e);

/* server_conn.c: the control socket and its clients (event loop thread). */
int server_conn_bind(struct server *s, struct moe_error *err);
void server_conn_accept(struct server *s);
void server_conn_readable(struct server *s, struct srv_client *c);
void server_conn_close(struct server *s, struct srv_client *c);
void server_conn_free(struct srv_client *c);
/* Closes the connections whose HELLO is overdue (timer tick). */
void server_conn_sweep(struct server *s);
/* Frees the clients the ring thread marked DEAD. */
void server_conn_reap(struct server *s);
int server_conn_send(int fd, uint16_t type, uint32_t seq, int32_t status, uint32_t arg, const void *payload,
		     uint32_t len, const int *fds, unsigned nfds);
int server_conn_error(struct server *s, struct srv_client *c, uint32_t seq, int status, const char *fmt, ...)
	MOE_PRINTF(5, 6);
/* Sends text back as a sealed memfd (no size limit on replies). */
int server_conn_text(struct srv_client *c, uint32_t seq, const char *text);

/* server_ring.c: the data plane. */
void *server_ring_main(void *arg);
/* Runs one entry (already copied out of shared memory). Returns 1 when the
 * completion is ready in *out, 0 when the entry was parked (ring only). */
int server_ring_exec(struct server *s, struct srv_client *c, const struct moet_sqe *q, struct moet_cqe *out,
		     bool may_park);

/* server_admin.c: admin and advisory requests. */
void server_admin_request(struct server *s, struct srv_client *c, const struct moet_msg *h, const uint8_t *payload);
void server_admin_gpu_export(struct server *s, struct srv_client *c, const struct moet_msg *h);
void server_admin_advise(struct server *s, struct srv_client *c, const struct moet_msg *h, const uint8_t *payload);
/* LATENT_BASIS: where one (layer, group)'s B matrices are. */
void server_admin_latent_basis(struct server *s, struct srv_client *c, const struct moet_msg *h,
			       const uint8_t *payload);

#endif
