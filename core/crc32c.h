/* crc32c.h - CRC32C (Castagnoli) of expert extents and pack metadata.
 * Backed by ISA-L's crc32_iscsi (SSE4.2 / PCLMUL, several GB/s per core). */
#ifndef MOETIER_CRC32C_H
#define MOETIER_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Standard CRC32C of buf (check value of "123456789" is 0xE3069283). */
uint32_t crc32c(const void *buf, size_t len);
/* Continues a CRC: crc32c_update(crc32c(a), b) == crc32c(a || b).
 * Start from crc = 0 for an empty prefix. */
uint32_t crc32c_update(uint32_t crc, const void *buf, size_t len);

#endif
