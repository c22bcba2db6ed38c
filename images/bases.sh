# Base images made here from Debian packages, standing in for the public images the
# Dockerfile names by default (no registry is reachable from the machines this project is
# built on). Sourced by images/build, which defines `bah` (buildah on the project's own
# storage), STATE, SUITE and MIRROR. Any change to this file rebuilds the bases: its hash
# is part of their recipe annotation.
#
#   debootstrap --variant=minbase ─▶ weft-base/debian:bookworm-slim  (PROXY_BASE)
#                                     ├─ + gcc, libc6-dev, ca-certificates (+ the host's extra CAs)
#                                     │  + the host's Rust toolchain ─▶ weft-base/rust:1.95-bookworm (BUILDER_IMAGE)
#                                     └─ files of libc6, libgcc-s1, ca-certificates, tzdata,
#                                        netbase, base-files; nonroot user ─▶ weft-base/distroless-cc:bookworm (OPERATOR_BASE)

BASE_SLIM=localhost/weft-base/debian:bookworm-slim
BASE_RUST=localhost/weft-base/rust:1.95-bookworm
BASE_CC=localhost/weft-base/distroless-cc:bookworm
# An annotation, not a label: labels are inherited by every image built FROM a base.
RECIPE_ANNOTATION=dev.weft.base.recipe
HOST_EXTRA_CAS=/usr/local/share/ca-certificates

# The recipe of the bases: this file, the suite, and the Rust toolchain copied in.
base_recipe() {
  {
    sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1
    echo "$SUITE $MIRROR"
    rustc --version --verbose
    cat "$HOST_EXTRA_CAS"/*.crt 2>/dev/null || true
  } | sha256sum | cut -c1-16
}

# The recipe label of a local image, or nothing when it does not exist.
image_recipe() {
  bah inspect --type image --format "{{index .ImageAnnotations \"$RECIPE_ANNOTATION\"}}" "$1" 2>/dev/null || true
}

# Commits the rootfs directory $1 as image $2 (config: $3...).
commit_rootfs() {
  local rootfs=$1 name=$2
  shift 2
  local ctr mnt
  ctr=$(bah from --pull=never scratch)
  mnt=$(bah mount "$ctr")
  tar -C "$rootfs" -c --numeric-owner . | tar -C "$mnt" -x --numeric-owner
  bah umount "$ctr" >/dev/null
  bah config --os linux --arch amd64 --annotation "$RECIPE_ANNOTATION=$RECIPE" "$@" "$ctr"
  bah commit --quiet --rm "$ctr" "$name" >/dev/null
}

# A minbase Debian with what debian:*-slim drops (docs, man pages, locales, apt lists).
make_slim_rootfs() {
  local rootfs=$1
  debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >"$STATE/debootstrap.log" 2>&1 || {
    tail -20 "$STATE/debootstrap.log" >&2
    return 1
  }
  # As the official slim images do: later `apt-get install`s skip docs too.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
EOF
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"$rootfs/etc/apt/sources.list"
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  rm -rf "$rootfs"/usr/share/{man,info,locale,groff,lintian}/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/* "$rootfs"/dev/* \
    "$rootfs"/tmp/* "$rootfs/debootstrap" "$rootfs/etc/resolv.conf" "$rootfs/etc/hostname"
}

# The files distroless's cc image carries, taken from the slim rootfs by package, plus the
# users root and nonroot (65532). The dynamic loader's paths go through bookworm's merged
# /usr (/lib -> usr/lib), so directories are resolved inside the rootfs and the links kept.
make_cc_rootfs() {
  local slim cc=$2 pkg path dir
  slim=$(cd "$1" && pwd -P)
  mkdir -p "$cc"
  for link in bin sbin lib lib64; do
    cp -a "$slim/$link" "$cc/$link"
  done
  for pkg in base-files netbase tzdata libc6 libgcc-s1 ca-certificates; do
    dpkg-query --admindir="$slim/var/lib/dpkg" -L "$pkg" | while read -r path; do
      [ -e "$slim$path" ] || [ -L "$slim$path" ] || continue
      [ -d "$slim$path" ] && [ ! -L "$slim$path" ] && continue
      # A shell script; the image has no shell to run it.
      [ "$path" = /usr/sbin/update-ca-certificates ] && continue
      dir=$(cd "$slim$(dirname "$path")" && pwd -P)
      dir=${dir#"$slim"}
      mkdir -p "$cc$dir"
      cp -a "$slim$path" "$cc$dir/"
    done
  done
  # The CA bundle ca-certificates' postinst wrote, and the links a TLS stack looks up.
  mkdir -p "$cc/etc/ssl/certs"
  cp -a "$slim/etc/ssl/certs/ca-certificates.crt" "$cc/etc/ssl/certs/"
  mkdir -p "$cc/tmp" "$cc/home/nonroot" "$cc/root" "$cc/proc" "$cc/sys" "$cc/dev" "$cc/etc"
  chmod 1777 "$cc/tmp"
  chmod 0700 "$cc/root"
  chown 65532:65532 "$cc/home/nonroot"
  cat >"$cc/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$cc/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
tty:x:5:
staff:x:50:
nonroot:x:65532:
EOF
  echo 'hosts: files dns' >"$cc/etc/nsswitch.conf"
}

# The bases, each rebuilt only when its recipe changed.
build_bases() {
  RECIPE=$(base_recipe)
  if [ "$(image_recipe "$BASE_SLIM")" = "$RECIPE" ] &&
    [ "$(image_recipe "$BASE_RUST")" = "$RECIPE" ] &&
    [ "$(image_recipe "$BASE_CC")" = "$RECIPE" ]; then
    log "base images are current (recipe $RECIPE)"
    return
  fi
  log "base images: debootstrap $SUITE from $MIRROR (recipe $RECIPE)"
  local work="$STATE/tmp/bases"
  rm -rf "$work"
  mkdir -p "$work"
  make_slim_rootfs "$work/slim"
  commit_rootfs "$work/slim" "$BASE_SLIM" --cmd '["bash"]' \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
  rm -rf "$work/slim"

  # The cc base takes its files from slim with ca-certificates installed (its postinst
  # writes the bundle); slim itself has none, like debian:bookworm-slim.
  local ctr mnt sysroot
  ctr=$(bah from --pull=never "$BASE_SLIM")
  bah run --isolation chroot "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ca-certificates netbase tzdata >/dev/null'
  mnt=$(bah mount "$ctr")
  make_cc_rootfs "$mnt" "$work/cc"
  bah umount "$ctr" >/dev/null
  bah rm "$ctr" >/dev/null
  commit_rootfs "$work/cc" "$BASE_CC" --user 65532:65532 --workingdir /home/nonroot \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt

  # The builder: the compilers ring needs, then the host's toolchain (rustc, cargo; no
  # docs) where the official rust image keeps its own.
  ctr=$(bah from --pull=never "$BASE_SLIM")
  bah run --isolation chroot "$ctr" -- sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc libc6-dev ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*'
  sysroot=$(rustc --print sysroot)
  mnt=$(bah mount "$ctr")
  # This machine's extra trust anchors (a TLS-inspecting egress proxy's CA, say), so
  # that cargo in the builder reaches crates.io as cargo on the host does. The builder
  # only: no runtime image carries them.
  if compgen -G "$HOST_EXTRA_CAS/*.crt" >/dev/null; then
    cp "$HOST_EXTRA_CAS"/*.crt "$mnt/usr/local/share/ca-certificates/"
    bah run --isolation chroot "$ctr" -- update-ca-certificates >/dev/null
  fi
  mkdir -p "$mnt/usr/local/rust" "$mnt/usr/local/cargo/bin"
  cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$mnt/usr/local/rust/"
  rm -rf "$mnt/usr/local/rust/lib/rustlib/"*.toml "$mnt/usr/local/rust/lib/rustlib/manifest-rust-docs"*
  for tool in cargo rustc rustdoc; do
    ln -s "../../rust/bin/$tool" "$mnt/usr/local/cargo/bin/$tool"
  done
  bah umount "$ctr" >/dev/null
  bah config --annotation "$RECIPE_ANNOTATION=$RECIPE" \
    --env CARGO_HOME=/usr/local/cargo \
    --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    "$ctr"
  bah commit --quiet --rm "$ctr" "$BASE_RUST" >/dev/null
  rm -rf "$work"
}
