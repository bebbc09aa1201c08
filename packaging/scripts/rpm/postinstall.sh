# shadowplane %post ($1: 1 on install, 2 on upgrade)
# controller.toml may hold a TSIG secret: readable by the controller's group only.
chgrp shadowplane /etc/shadowplane/controller.toml 2>/dev/null || :
chmod 0640 /etc/shadowplane/controller.toml 2>/dev/null || :
[ -d /var/lib/shadowplane ] || install -d -o shadowplane -g shadowplane -m 0750 /var/lib/shadowplane
exit 0
