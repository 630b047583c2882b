# nooelint: oelint.var.bbclassextend - a target daemon with a service user; nothing to run natively
SUMMARY = "Offline LLM daemon for edge appliances"
DESCRIPTION = "fieldllmd answers field equipment over MQTT and technicians at a serial \
               console with a small quantized Llama-family model run by tract, and keeps \
               the accelerator inside its power and thermal envelope."
# nooelint: oelint.vars.homepageping - CI runs offline
HOMEPAGE = "https://github.com/fieldllm/fieldllm"
BUGTRACKER = "https://github.com/fieldllm/fieldllm/issues"
SECTION = "console/network"
CVE_PRODUCT = "fieldllm"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

SRC_URI = "git://github.com/fieldllm/fieldllm.git;protocol=https;branch=main"
SRCREV = "acc1a51ea52addc2776bfe3ba414f3e7e284043a"

S = "${WORKDIR}/git"

inherit cargo cargo-update-recipe-crates systemd useradd

# every crate of Cargo.lock, with its sha256: the build runs `cargo build --frozen`, offline
require ${BPN}-crates.inc

# the workspace's daemon crate, which pulls the engine (engine/), the wire schema (proto/) and
# the firmware bridge (firmware-bridge/) in by path; Cargo.lock is the workspace's
CARGO_SRC_DIR = "daemon"

SYSTEMD_SERVICE:${PN} = "fieldllmd.service"

USERADD_PACKAGES = "${PN}"
USERADD_PARAM:${PN} = "--system --home-dir ${localstatedir}/lib/fieldllm --no-create-home \
                       --shell /sbin/nologin --user-group fieldllm"

do_install:append() {
    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${S}/systemd/fieldllmd.service ${D}${systemd_system_unitdir}/
    install -d ${D}${nonarch_libdir}/sysusers.d
    install -m 0644 ${S}/systemd/fieldllm.sysusers ${D}${nonarch_libdir}/sysusers.d/fieldllm.conf
    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${S}/systemd/70-fieldllm.rules ${D}${nonarch_base_libdir}/udev/rules.d/
    install -d -m 0755 ${D}${sysconfdir}/fieldllm
    # may hold a broker password: readable by the service's group only
    install -m 0640 -g fieldllm ${S}/systemd/fieldllmd.toml ${D}${sysconfdir}/fieldllm/
}

FILES:${PN} += "\
    ${nonarch_libdir}/sysusers.d \
    ${nonarch_base_libdir}/udev/rules.d \
"
CONFFILES:${PN} = "${sysconfdir}/fieldllm/fieldllmd.toml"
RRECOMMENDS:${PN} = "fieldllm-model-smollm2"
