# Multi-stage build of insights-proxy. (Not built in this project's CI: the build machines have no
# container engine.)  docker build -t insights-proxy . && docker run -p 8080:8080 -p 9090:9090 insights-proxy \
#   --upstream https://us.posthog.com --listen 0.0.0.0:8080 --admin-listen 0.0.0.0:9090
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The build recipe CI runs (scripts/setup.sh build, then cargo build --locked), in release;
# tests/deploy_files.rs keeps this stage to it.
RUN scripts/build.sh --release

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/* \
    && useradd --system --no-create-home insights-proxy
COPY --from=build /src/target/release/insights-proxy /usr/local/bin/insights-proxy
COPY config/example.toml /etc/insights-proxy/config.toml
USER insights-proxy
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/insights-proxy"]
CMD ["--config", "/etc/insights-proxy/config.toml", "--listen", "0.0.0.0:8080", "--admin-listen", "0.0.0.0:9090"]
