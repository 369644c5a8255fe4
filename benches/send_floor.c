// benches/send_floor.c: the kernel's cost of answering one HTTP/1.1 request with the same cached
// body, by each way a server can hand the body to the socket. Built and run by send-floor.sh.
//
//   send_floor PORT SIZE MODE
//
// A single-threaded epoll server on 127.0.0.1:PORT that answers every request it reads with a fixed
// head and SIZE bytes of body. MODE says how the body reaches the socket:
//   copy          writev(head, body) from the heap: the kernel copies the body
//   memfd         send(head, MSG_MORE) + sendfile from a sealed memfd (shmem, 4 KiB pages): how
//                 insights-proxy sends bodies of sendfile_min_bytes and more
//   disk          send(head, MSG_MORE) + sendfile from an unlinked file in DISK_DIR (O_TMPFILE; the
//                 page cache of a disk filesystem, large folios on ext4/xfs): how nginx sends a
//                 proxy_cache file with sendfile on
//   vmsplice      send(head, MSG_MORE) + vmsplice of anonymous 4 KiB pages into a pipe + splice
//   vmsplice-thp  the same from a transparent huge page (madvise; 2 MiB)
// On SIGTERM it prints the requests answered and its user and system CPU time per request.
// It reads one request per readable event (wrk keeps one request in flight per connection).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

enum mode { COPY, MEMFD, DISK, VMSPLICE, VMSPLICE_THP };
static const char *names[] = {"copy", "memfd", "disk", "vmsplice", "vmsplice-thp"};

static enum mode mode;
static size_t size, head_len;
static char head[256], *body;
static int file = -1, pipe_fds[2];
static volatile long answered;

static void report(int sig) {
  (void)sig;
  struct rusage r;
  getrusage(RUSAGE_SELF, &r);
  double user = r.ru_utime.tv_sec * 1e6 + r.ru_utime.tv_usec;
  double sys = r.ru_stime.tv_sec * 1e6 + r.ru_stime.tv_usec;
  long n = answered > 0 ? answered : 1;
  dprintf(2, "%s %ld %.3f %.3f\n", names[mode], answered, user / n, sys / n);
  _exit(0);
}

static void die(const char *what) {
  perror(what);
  exit(1);
}

// Blocking-style loops on a non-blocking socket: a full socket is retried (the benchmark's
// connections are drained by wrk at once); any other error drops the connection.
static int write_all(int s, const char *p, size_t n) {
  while (n) {
    ssize_t w = write(s, p, n);
    if (w < 0 && errno == EAGAIN) continue;
    if (w <= 0) return -1;
    p += w, n -= (size_t)w;
  }
  return 0;
}

static int answer(int s) {
  if (mode == COPY) {
    struct iovec v[2] = {{head, head_len}, {body, size}};
    ssize_t w = writev(s, v, 2);
    if (w < 0 && errno != EAGAIN) return -1;
    size_t done = w < 0 ? 0 : (size_t)w;
    if (done < head_len && write_all(s, head + done, head_len - done)) return -1;
    size_t from = done > head_len ? done - head_len : 0;
    return write_all(s, body + from, size - from);
  }
  if (send(s, head, head_len, MSG_MORE) != (ssize_t)head_len) return -1;
  if (mode == MEMFD || mode == DISK) {
    off_t off = 0;
    while (off < (off_t)size) {
      ssize_t w = sendfile(s, file, &off, size - (size_t)off);
      if (w < 0 && errno == EAGAIN) continue;
      if (w <= 0) return -1;
    }
    return 0;
  }
  struct iovec v = {body, size};
  if (vmsplice(pipe_fds[1], &v, 1, 0) != (ssize_t)size) die("vmsplice");
  size_t left = size;
  while (left) {
    ssize_t w = splice(pipe_fds[0], NULL, s, NULL, left, 0);
    if (w < 0 && errno == EAGAIN) continue;
    if (w <= 0) die("splice"); // the pipe would keep bytes meant for this connection
    left -= (size_t)w;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: send_floor PORT SIZE copy|memfd|disk|vmsplice|vmsplice-thp\n");
    return 2;
  }
  int port = atoi(argv[1]);
  size = (size_t)atol(argv[2]);
  int found = 0;
  for (int m = COPY; m <= VMSPLICE_THP; m++)
    if (!strcmp(argv[3], names[m])) mode = (enum mode)m, found = 1;
  if (!found || size == 0) return 2;

  char *heap = malloc(size);
  if (!heap) die("malloc");
  for (size_t i = 0; i < size; i++) heap[i] = (char)('a' + i % 26);
  head_len = (size_t)snprintf(head, sizeof head,
                              "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                              "Cache-Status: send_floor; hit\r\n\r\n",
                              size);
  body = heap;
  if (mode == MEMFD) {
    file = memfd_create("send_floor", MFD_ALLOW_SEALING);
    if (file < 0 || write(file, heap, size) != (ssize_t)size) die("memfd");
    fcntl(file, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL);
  } else if (mode == DISK) {
    const char *dir = getenv("DISK_DIR") ? getenv("DISK_DIR") : "/var/tmp";
    file = open(dir, O_TMPFILE | O_RDWR, 0600);
    if (file < 0 || write(file, heap, size) != (ssize_t)size) die("O_TMPFILE");
    fsync(file); // as nginx's cache file, long written back when the hits come
  } else if (mode == VMSPLICE || mode == VMSPLICE_THP) {
    if (pipe(pipe_fds)) die("pipe");
    fcntl(pipe_fds[0], F_SETPIPE_SZ, 1 << 20);
    size_t span = mode == VMSPLICE ? size : (size_t)4 << 20;
    char *m = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) die("mmap");
    if (mode == VMSPLICE_THP) {
      m = (char *)(((unsigned long)m + (2UL << 20) - 1) & ~((2UL << 20) - 1));
      madvise(m, 2UL << 20, MADV_HUGEPAGE);
      memset(m, 0, 2UL << 20);
    }
    memcpy(m, heap, size);
    body = m;
  }
  signal(SIGTERM, report);

  int one = 1, ls = socket(AF_INET, SOCK_STREAM, 0);
  setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port),
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (bind(ls, (struct sockaddr *)&addr, sizeof addr) || listen(ls, 1024)) die("listen");
  int ep = epoll_create1(0);
  struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls}, events[128];
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
  char request[8192];
  for (;;) {
    int n = epoll_wait(ep, events, 128, -1);
    for (int i = 0; i < n; i++) {
      int s = events[i].data.fd;
      if (s == ls) {
        int c = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
        if (c < 0) continue;
        setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
        epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
        continue;
      }
      ssize_t r = recv(s, request, sizeof request, 0);
      if (r < 0 && errno == EAGAIN) continue;
      if (r <= 0 || answer(s)) {
        close(s);
        continue;
      }
      answered++;
    }
  }
}
