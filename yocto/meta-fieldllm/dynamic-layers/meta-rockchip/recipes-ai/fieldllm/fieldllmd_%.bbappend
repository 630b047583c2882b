# Rockchip RK3588 (meta-rockchip): the NPU's render node and devfreq controls for the service.
do_install:append() {
    install -d ${D}${systemd_system_unitdir}/fieldllmd.service.d
    install -m 0644 ${S}/systemd/dropins/rockchip.conf ${D}${systemd_system_unitdir}/fieldllmd.service.d/
}

