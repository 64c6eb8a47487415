/* fuzz_ring.c - libFuzzer target for the daemon's decoder of ring
 * submission entries: server_ring_exec, the function the ring thread runs on
 * every entry it pops from a client's shared-memory ring (and the socket
 * SUBMIT path on the event loop), on a client that attached with a real
 * HELLO.
 *
 * Input: u16 scratch length, that many bytes written at the start of the
 * client's scratch area (ROUTE logits, COMPUTE arguments), then entries of
 * sizeof(struct moet_sqe) bytes each, executed in order. Entries are
 * executed as a blocking acquire on the socket path (may_park false: the
 * parking and its retries are the ring thread's, not the decoder's).
 *
 * Checked beyond "no crash, no sanitizer report": every completion is well
 * formed (count within the batch, hits + misses = count), every expert
 * served is the expert asked for, byte for byte, every lease given out is
 * released at the end and the cache's invariants hold (checked every 16 inputs).
 *
 * Build: ./configure --enable-fuzz && make tests/fuzz/fuzz_ring
 * Run:   tests/fuzz/fuzz_ring -dict=$srcdir/tests/fuzz/ring.dict CORPUS $srcdir/tests/fuzz/corpus/ring */
#include "config.h"

#include <stddef.h>
#include <stdint.h>

#include "fuzz_server.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct srv_client *cl;
static unsigned cl_idx;
static int cl_fd = -1;

static void attach(struct server *s)
{
	struct moet_msg h = { MOET_MSG_MAGIC, MOET_PROTO_VERSION, MOET_MSG_HELLO, 1, 0, 0, sizeof(struct moet_hello) };
	struct moet_hello hello = { .version_min = MOET_PROTO_MIN_VERSION, .version_max = MOET_PROTO_VERSION };
	uint8_t buf[sizeof(h) + sizeof(hello)];
	snprintf(hello.client_name, sizeof(hello.client_name), "fuzz");
	memcpy(buf, &h, sizeof(h));
	memcpy(buf + sizeof(h), &hello, sizeof(hello));
	cl = fz_connect(s, &cl_fd);
	cl_idx = cl->idx;
	if (send(cl_fd, buf, sizeof(buf), 0) != (ssize_t)sizeof(buf))
		fz_die("HELLO", strerror(errno));
	server_conn_readable(s, cl);
	fz_drain(cl_fd);
	if (!fz_alive(s, cl, cl_idx) || !cl->hello_done || !cl->region)
		fz_die("HELLO", "the server refused the fuzzer's client");
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct server *s = fz_server();
	if (!cl)
		attach(s);
	if (size < 2 || size > 2 + 65536 + 64 * sizeof(struct moet_sqe))
		return 0;
	uint16_t scratch_len;
	memcpy(&scratch_len, data, 2);
	data += 2;
	size -= 2;
	if (scratch_len > size)
		scratch_len = (uint16_t)size;
	if (scratch_len > cl->reg.scratch_bytes)
		scratch_len = (uint16_t)cl->reg.scratch_bytes;
	/* the scratch area as the client left it: zero but this input's bytes */
	static uint16_t last_len;
	uint8_t *scratch = cl->region + cl->reg.scratch_off;
	memset(scratch, 0, last_len);
	memcpy(scratch, data, scratch_len);
	last_len = scratch_len;
	data += scratch_len;
	size -= scratch_len;

	uint64_t leases[64];
	unsigned n_leases = 0;
	while (size >= sizeof(struct moet_sqe)) {
		struct moet_sqe q;
		struct moet_cqe out;
		memcpy(&q, data, sizeof(q));
		data += sizeof(q);
		size -= sizeof(q);
		if (server_ring_exec(s, cl, &q, &out, false) != 1)
			fz_die("exec", "an entry was parked although parking was not allowed");
		if (out.count > MOET_MAX_BATCH || out.user_tag != q.user_tag || out.opcode != q.opcode)
			fz_die("completion", "malformed");
		if ((q.opcode == MOET_OP_ACQUIRE || q.opcode == MOET_OP_ROUTE) && out.result >= 0) {
			if (out.n_hit + out.n_miss != out.count || (uint32_t)out.result != out.n_hit)
				fz_die("completion", "hits and misses do not add up to the experts asked for");
			for (unsigned i = 0; i < out.count; i++) {
				if (out.ids[i] >= FZ_EXPERTS)
					fz_die("completion", "an expert out of range");
				if (out.slot[i] >= 0)
					fz_check_slot(s, out.tier[i], out.slot[i], q.layer, out.ids[i]);
			}
			if (q.opcode == MOET_OP_ACQUIRE)
				for (unsigned i = 0; i < out.count; i++)
					if (out.ids[i] != q.ids[i])
						fz_die("completion", "ACQUIRE answered other experts than asked");
		}
		if (out.lease && q.opcode != MOET_OP_RELEASE && n_leases < 64)
			leases[n_leases++] = out.lease;
	}
	/* Give back what this input took, through the decoder too. A lease the
	 * input released itself answers -ESTALE. */
	for (unsigned i = 0; i < n_leases; i++) {
		struct moet_sqe q = { .opcode = MOET_OP_RELEASE, .lease = leases[i] };
		struct moet_cqe out;
		server_ring_exec(s, cl, &q, &out, false);
		if (out.result != 0 && out.result != -ESTALE)
			fz_die("release", "a lease given out could not be released");
	}
	if (cl->n_leases_used != 0 || cl->held[0] || cl->held[1])
		fz_die("leases", "the client still holds leases after releasing every one it was given");
	fz_drain(cl_fd);
	fz_reset_config();
	fz_settle(s);
	struct moe_error err = { "" };
	static unsigned n_inputs;
	if (++n_inputs % 16 == 0 && cache_check_invariants(s->models[0].cache, &err))
		fz_die("cache invariants", err.msg);
	return 0;
}
