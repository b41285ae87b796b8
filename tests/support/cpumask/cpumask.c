/*
 * LD_PRELOAD library that makes this CPU look older to every program it is loaded into:
 * CPUID answers lose the instruction sets above the level in $AMXTUNE_CPUMASK
 *   avx2    AVX2 but no AVX-512, AVX-VNNI, AVX-NE-CONVERT, AVX10 or AMX (like AMD Zen 3)
 *   avx512  AVX-512 F/CD/BW/DQ/VL/VNNI but no BF16, FP16, AVX-NE-CONVERT, AVX10 or AMX
 *           (like Cascade Lake)
 * so PyTorch (cpuinfo), oneDNN and OpenVINO choose the kernels they would choose there and
 * run them natively. Features can only be taken away, never added.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, flag cpuid_fault in /proc/cpuinfo)
 * turns every CPUID instruction into a SIGSEGV; the handler runs the real CPUID, masks the
 * bits and skips the instruction. Faulting survives fork and clone and is reset by execve,
 * where LD_PRELOAD loads this library again.
 *
 * Without faulting (many VMs), CPUID cannot be changed. Then the kernel's view is masked
 * instead: opening /proc/cpuinfo gives a copy whose flags lines lose the same features. The
 * trainer counts a feature only when CPUID and the kernel both list it, so it sees the older
 * CPU; oneDNN, ATen and MKL are held to the level by their own variables, which
 * tests/support/cpumask.py sets. The tests' helper checks that the mask took.
 *
 * Programs install SIGSEGV handlers of their own (Python's faulthandler, which pytest enables):
 * sigaction() and signal() for SIGSEGV are intercepted, so the mask's handler stays in place and
 * theirs is called for every SIGSEGV that is not a CPUID.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int level_avx512;
static int active;
static int mask_cpuinfo; /* no CPUID faulting: mask the kernel's view instead */
static struct sigaction chained; /* the program's own SIGSEGV handler, as it believes set */

static int real_sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    static int (*next)(int, const struct sigaction *, struct sigaction *);
    if (next == NULL) next = dlsym(RTLD_NEXT, "sigaction");
    return next(sig, act, old);
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (sig != SIGSEGV || !active) return real_sigaction(sig, act, old);
    if (old != NULL) *old = chained;
    if (act != NULL) chained = *act;
    return 0;
}

sighandler_t signal(int sig, sighandler_t handler) {
    struct sigaction act, old;
    memset(&act, 0, sizeof act);
    act.sa_handler = handler;
    act.sa_flags = SA_RESTART;
    sigemptyset(&act.sa_mask);
    return sigaction(sig, &act, &old) == 0 ? old.sa_handler : SIG_ERR;
}

static void real_cpuid(unsigned leaf, unsigned sub, unsigned r[4]) {
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
    __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}

/* r = {eax, ebx, ecx, edx} */
static void mask(unsigned leaf, unsigned sub, unsigned r[4]) {
    if (leaf == 7 && sub == 0) {
        /* EBX: AVX512 F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31 */
        unsigned keep512 = BIT(16) | BIT(17) | BIT(28) | BIT(30) | BIT(31);
        r[1] &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31))
                | (level_avx512 ? keep512 : 0);
        /* ECX: VBMI 1, VBMI2 6, VNNI 11, BITALG 12, VPOPCNTDQ 14 */
        r[2] &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14)) | (level_avx512 ? BIT(11) : 0);
        /* EDX: 4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX-BF16 22, AVX512-FP16 23,
           AMX-TILE 24, AMX-INT8 25 */
        r[3] &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        /* EAX: AVX-VNNI 4, AVX512-BF16 5, AMX-FP16 21, AVX-IFMA 23 */
        r[0] &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23));
        /* EDX: AVX-VNNI-INT8 4, AVX-NE-CONVERT 5, AMX-COMPLEX 8, AVX10 19 */
        r[3] &= ~(BIT(4) | BIT(5) | BIT(8) | BIT(19));
    } else if (leaf == 0xd && sub == 0) {
        /* XSAVE components: opmask/ZMM state 5-7, AMX tile config/data 17-18 */
        r[0] &= ~((level_avx512 ? 0 : BIT(5) | BIT(6) | BIT(7)) | BIT(17) | BIT(18));
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) {
        r[0] = r[1] = r[2] = r[3] = 0; /* AMX tile and AVX10 information */
    }
}

static void on_segv(int sig, siginfo_t *info, void *raw) {
    ucontext_t *context = raw;
    greg_t *reg = context->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)reg[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
        unsigned r[4];
        unsigned leaf = (unsigned)reg[REG_RAX], sub = (unsigned)reg[REG_RCX];
        real_cpuid(leaf, sub, r);
        mask(leaf, sub, r);
        reg[REG_RAX] = r[0];
        reg[REG_RBX] = r[1];
        reg[REG_RCX] = r[2];
        reg[REG_RDX] = r[3];
        reg[REG_RIP] += 2;
        return;
    }
    /* A real crash: the program's own handler, or the default (the fault repeats and kills). */
    if ((chained.sa_flags & SA_SIGINFO) && chained.sa_sigaction != NULL) {
        chained.sa_sigaction(sig, info, raw);
    } else if (chained.sa_handler != SIG_DFL && chained.sa_handler != SIG_IGN) {
        chained.sa_handler(sig);
    } else {
        struct sigaction fallback;
        memset(&fallback, 0, sizeof fallback);
        fallback.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &fallback, NULL);
    }
}

/* ---- the kernel's view: /proc/cpuinfo without the masked features ---------------------- */

static int masked_flag(const char *flag, size_t length) {
    static const char *kept512[] = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl",
                                    "avx512_vnni"};
    if (level_avx512)
        for (size_t i = 0; i < sizeof kept512 / sizeof *kept512; i++)
            if (strlen(kept512[i]) == length && memcmp(flag, kept512[i], length) == 0) return 0;
    return (length >= 6 && memcmp(flag, "avx512", 6) == 0) ||
           (length >= 3 && memcmp(flag, "amx", 3) == 0) ||
           (length >= 4 && memcmp(flag, "avx_", 4) == 0) ||
           (length >= 5 && memcmp(flag, "avx10", 5) == 0);
}

static void write_all(int fd, const char *data, size_t length) {
    while (length > 0) {
        ssize_t n = write(fd, data, length);
        if (n <= 0) return;
        data += n;
        length -= (size_t)n;
    }
}

/* A memfd holding /proc/cpuinfo with the masked flags left out, at offset 0. */
static int masked_cpuinfo(void) {
    static int (*next_open)(const char *, int, ...);
    if (next_open == NULL) next_open = dlsym(RTLD_NEXT, "open");
    int source = next_open("/proc/cpuinfo", O_RDONLY | O_CLOEXEC);
    if (source < 0) return -1;
    size_t capacity = 1 << 16, length = 0;
    char *text = malloc(capacity);
    for (ssize_t n; text != NULL; length += (size_t)n) {
        if (length == capacity) {
            char *grown = realloc(text, capacity *= 2);
            if (grown == NULL) { free(text); text = NULL; break; }
            text = grown;
        }
        n = read(source, text + length, capacity - length);
        if (n <= 0) break;
    }
    close(source);
    int out = text != NULL ? memfd_create("cpuinfo", MFD_CLOEXEC) : -1;
    for (char *line = text, *end = text + length; out >= 0 && line < end;) {
        char *newline = memchr(line, '\n', (size_t)(end - line));
        char *next = newline != NULL ? newline + 1 : end;
        char *colon = memchr(line, ':', (size_t)(next - line));
        if (strncmp(line, "flags", 5) != 0 || colon == NULL) {
            write_all(out, line, (size_t)(next - line));
        } else {
            write_all(out, line, (size_t)(colon + 1 - line));
            for (char *word = colon + 1; word < next;) {
                while (word < next && (*word == ' ' || *word == '\t' || *word == '\n')) word++;
                char *stop = word;
                while (stop < next && *stop != ' ' && *stop != '\t' && *stop != '\n') stop++;
                if (stop > word && !masked_flag(word, (size_t)(stop - word))) {
                    write_all(out, " ", 1);
                    write_all(out, word, (size_t)(stop - word));
                }
                word = stop;
            }
            write_all(out, "\n", 1);
        }
        line = next;
    }
    free(text);
    if (out >= 0) lseek(out, 0, SEEK_SET);
    return out;
}

static int is_cpuinfo(const char *path) {
    return mask_cpuinfo && path != NULL && strcmp(path, "/proc/cpuinfo") == 0;
}

#define OPEN_MODE(flags, mode)                                   \
    do {                                                         \
        if ((flags) & (O_CREAT | O_TMPFILE)) {                   \
            va_list args;                                        \
            va_start(args, flags);                               \
            mode = va_arg(args, int);                            \
            va_end(args);                                        \
        }                                                        \
    } while (0)

#define INTERCEPT_OPEN(name)                                                       \
    int name(const char *path, int flags, ...) {                                   \
        static int (*next)(const char *, int, ...);                                \
        int mode = 0;                                                              \
        OPEN_MODE(flags, mode);                                                    \
        if (is_cpuinfo(path)) return masked_cpuinfo();                             \
        if (next == NULL) next = dlsym(RTLD_NEXT, #name);                          \
        return next(path, flags, mode);                                            \
    }
INTERCEPT_OPEN(open)
INTERCEPT_OPEN(open64)

#define INTERCEPT_OPENAT(name)                                                     \
    int name(int dir, const char *path, int flags, ...) {                          \
        static int (*next)(int, const char *, int, ...);                           \
        int mode = 0;                                                              \
        OPEN_MODE(flags, mode);                                                    \
        if (is_cpuinfo(path)) return masked_cpuinfo();                             \
        if (next == NULL) next = dlsym(RTLD_NEXT, #name);                          \
        return next(dir, path, flags, mode);                                       \
    }
INTERCEPT_OPENAT(openat)
INTERCEPT_OPENAT(openat64)

#define INTERCEPT_FOPEN(name)                                                      \
    FILE *name(const char *path, const char *how) {                                \
        static FILE *(*next)(const char *, const char *);                          \
        if (is_cpuinfo(path)) {                                                    \
            int fd = masked_cpuinfo();                                             \
            return fd < 0 ? NULL : fdopen(fd, "r");                                \
        }                                                                          \
        if (next == NULL) next = dlsym(RTLD_NEXT, #name);                          \
        return next(path, how);                                                    \
    }
INTERCEPT_FOPEN(fopen)
INTERCEPT_FOPEN(fopen64)

__attribute__((constructor)) static void install(void) {
    const char *level = getenv("AMXTUNE_CPUMASK");
    if (level == NULL || strcmp(level, "none") == 0) return;
    level_avx512 = strcmp(level, "avx512") == 0;
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_segv;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    if (real_sigaction(SIGSEGV, &action, &chained) != 0) return;
    if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        real_sigaction(SIGSEGV, &chained, NULL); /* no CPUID faulting here */
        mask_cpuinfo = 1;
        return;
    }
    active = 1;
}
