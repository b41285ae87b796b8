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
 * where LD_PRELOAD loads this library again. Without faulting nothing is masked; the tests'
 * helper (tests/support/cpumask.py) checks that the mask took.
 *
 * Programs install SIGSEGV handlers of their own (Python's faulthandler, which pytest enables):
 * sigaction() and signal() for SIGSEGV are intercepted, so the mask's handler stays in place and
 * theirs is called for every SIGSEGV that is not a CPUID.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int level_avx512;
static int active;
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
        real_sigaction(SIGSEGV, &chained, NULL); /* no CPUID faulting here: mask nothing */
        return;
    }
    active = 1;
}
