// Which ISA translation units (isa/avx512.cpp, isa/avx2.cpp, isa/amx.cpp) are compiled in (no
// torch headers).
#pragma once

// The AVX2 / AVX-512 kernels rely on GCC's `#pragma GCC target` on x86 (Clang ignores that pragma;
// it would need `#pragma clang attribute`). Anywhere else only the scalar kernels are built.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define FVK_X86_KERNELS 1
#else
#define FVK_X86_KERNELS 0
#endif

// The levels with bf16 products (isa/amx.cpp, isa/avx512bf16.cpp, built together) also need GCC
// 11's AMX intrinsics, 64-bit mode (AMX has no 32-bit form) and Linux (the tile data permission is
// asked with arch_prctl).
#if FVK_X86_KERNELS && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 11
#define FVK_BF16_KERNELS 1
#else
#define FVK_BF16_KERNELS 0
#endif
