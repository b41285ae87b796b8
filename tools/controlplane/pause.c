/* The pod sandbox's process for the e2e tier's real nodes (containerd's sandbox image):
 * it holds the pod's namespaces until the kubelet stops the pod. Built static, FROM scratch. */
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

static void stop(int signo) { (void)signo; _exit(0); }

int main(void) {
    signal(SIGINT, stop);
    signal(SIGTERM, stop);
    for (;;) pause();
}
