# monedge: `twistd monedge` on Debian's own Python 3.11, run as a numeric
# non-root user on a read-only root filesystem (deploy/kubernetes).
#
#   docker build -t ghcr.io/monedge/monedge:0.1.0 .
#
# The container's arguments are monedge's options, after
# `twistd -n --pidfile= monedge`:
#
#   docker run --rm ghcr.io/monedge/monedge:0.1.0 --help
#
# The interpreter is Debian bookworm's python3 (3.11), the build `make`
# uses on a Debian machine (scripts/python.sh) and the one the benchmarks
# in docs/performance.md measure: profile-guided, LTO, linked statically.
FROM debian:bookworm-slim

# No .pyc writes at run time (the root filesystem is read-only there, and
# pip already compiled the installed modules at build time); log lines
# leave the process as they are written.  monedge lives in its own venv,
# first on PATH: python, pip and twistd are the venv's.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/monedge/bin:$PATH

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/monedge

# The user monedge runs as. Numeric in USER below, so that Kubernetes can
# check runAsNonRoot without reading /etc/passwd; the passwd entry exists
# only so that tools show a name.
RUN groupadd --system --gid 10001 monedge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin monedge

# Only what the package build needs (setup.cfg reads README.md for the long
# description); the source tree is deleted after the install.
WORKDIR /src
COPY pyproject.toml setup.cfg README.md ./
COPY monedge/ monedge/
COPY twisted/ twisted/
RUN pip install --no-cache-dir . \
 && rm -rf /src
WORKDIR /

# Write twisted/plugins/dropin.cache (and monedge/plugins/dropin.cache, for
# the hook plugins) into site-packages now, as root.
# twistd finds the monedge plugin through this cache, and rewrites it when
# a plugin module is newer than the cache. At run time the root filesystem
# is read-only (and the user is not root), so it cannot be written then:
# every start would import every plugin module again and log "Unable to
# write to plugin cache". The second command fails the build if twistd
# cannot find the monedge plugin.
RUN python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && python -c "import monedge.plugins; from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin, monedge.plugins))" \
 && twistd monedge --help > /dev/null

USER 10001:10001

# 30080: the proxy (--port). 30081: the admin listener (--admin-port):
# /healthz, /readyz, /metrics, /routes.
EXPOSE 30080 30081

# -n: stay in the foreground; --pidfile=: write no pid file (read-only
# filesystem, and nothing needs one). twistd logs to standard output in the
# foreground; the access log goes there too by default (--access-log -).
# twistd is PID 1 and handles SIGTERM itself: /readyz turns 503 and
# monedge drains (docs/configuration.md, Draining).
ENTRYPOINT ["twistd", "-n", "--pidfile=", "monedge"]
CMD ["--registry", "kubernetes"]
