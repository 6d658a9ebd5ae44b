P=/work/main/.venv/bin/python
run() { ( cd /tmp/wt-$1 && PYTHONPATH=. $P scripts/decode-steps.py models/qwen-quarter $2 $3 $4 2 128 2>&1 | grep -v Warn | sed "s/^/$1 /" ); }
for r in 1 2; do
 for v in cur new; do run $v 0 1 16; done
 for v in cur new; do run $v 0 6 8; done
done
for r in 1 2; do
 for v in cur new; do FAASMOE_COMPILE_EXPERTS=1 run $v 60 1 16; done
 for v in cur new; do FAASMOE_COMPILE_EXPERTS=1 run $v 60 6 8; done
done
echo DONE
