/* CRC32C in overlaybd's "raw" form (see crc32c.c). */
#ifndef OBD_CRC32C_H
#define OBD_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Build the tables and probe the CPU. Call once before anything else (not thread safe). */
void obd_crc32c_init(void);

/* Raw CRC32C of data[0..n): Castagnoli, reflected, the register starts at `seed`, no
 * initial and no final inversion. Thread safe after obd_crc32c_init(). */
uint32_t obd_crc32c(uint32_t seed, const void *data, size_t n);

/* The same, always with the portable table code (to test it on any machine). */
uint32_t obd_crc32c_portable(uint32_t seed, const void *data, size_t n);

/* 1 when the SSE4.2 crc32 instruction is used, else 0 (portable table code). */
int obd_crc32c_hardware(void);

#endif
