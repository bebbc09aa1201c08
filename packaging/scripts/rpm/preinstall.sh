# shadowplane %pre: the controller's unprivileged user, before its files are laid down.
getent group shadowplane >/dev/null || groupadd --system shadowplane
getent passwd shadowplane >/dev/null || useradd --system --gid shadowplane --home-dir /var/lib/shadowplane \
    --no-create-home --shell /sbin/nologin --comment "Shadowplane controller" shadowplane
exit 0
