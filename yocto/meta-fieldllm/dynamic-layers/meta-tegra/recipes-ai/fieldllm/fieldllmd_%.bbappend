# NVIDIA Jetson (meta-tegra): the GPU device nodes and devfreq controls for the service, and
# nvpmodel for the power mode the firmware bridge reads.
do_install:append() {
    install -d ${D}${systemd_system_unitdir}/fieldllmd.service.d
    install -m 0644 ${S}/systemd/dropins/jetson.conf ${D}${systemd_system_unitdir}/fieldllmd.service.d/
}

RRECOMMENDS:${PN} += "tegra-nvpmodel"
