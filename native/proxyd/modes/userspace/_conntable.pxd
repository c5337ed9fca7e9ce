# Cython finds a module's .pxd by its full name (proxyd.modes.userspace._conntable): the declarations
# live in native/conntable.pxd.
include "../../../conntable.pxd"
