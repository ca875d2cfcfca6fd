"""Every private API of another library that cam_monitor relies on, in one place, each pinned and tested.

None is called today. Lightning's own extension points that are protected by name but documented
for subclasses (``ModelCheckpoint._save_topk_checkpoint`` and ``_save_last_checkpoint``,
``Callback._generate_state_key``) are used where they are documented, in
:mod:`cam_monitor.checkpoint` and :mod:`cam_monitor.callback`. One private attribute is read and
set there: ``ModelCheckpoint._last_checkpoint_saved`` (the file ``save_last="link"`` links to),
cleared for the one save that must write ``last.ckpt`` as a file while a gate refuses the top-k save.
``tests/test_compat.py`` checks these signatures and the attribute against the installed Lightning, and CI also against the oldest Lightning the
package allows (README, "Development"). TensorBoard images go through tensorboardX's public
``FileWriter.add_summary`` (:mod:`cam_monitor.sinks.tensorboard`), which replaced the one private
call this module used to hold (``SummaryWriter._get_file_writer``).
"""
